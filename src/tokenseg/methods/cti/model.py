"""CTI's class-token ViT (Class Tokens Infusion, CVPR 2024; METHODS.md §8, errata §16.11–16.15).

What it adds to :class:`~tokenseg.models.classtoken.ClassTokenViT` (as the authors' ``MCTformerV2_CTI``):

* **C + 1 tokens**, index 0 the background token: a tokenizer MLP (D → 5D → D·(C+1)) maps the one
  foreground token ``cls_token`` to C + 1 tokens; ``cls_token`` is added to tokens 1..C, ``bg_token``
  to token 0, then ``pos_embed_cls`` ((C+1)×D). PatchCAM head with C + 1 outputs; class scores =
  mean over D of output tokens 1..C, patch scores = GAP of channels 1..C; no final LayerNorm.
* **The training forward does every pass of their ``update()`` in one call** (DDP sees one forward):
  view 1 and view 2 run their first ``swap + 1`` blocks as one batch; view 1 continues alone with
  explicit attention only in the layers the BG-CAM loss reads; view 2's continuation, the intra-image
  infusion pass and the cross-image infusion pass continue from the *same* block-``swap`` tokens as one
  batch, with fused attention (only the class-token rows are computed explicitly, for the cross pass).
  Their code recomputes the first blocks of view 1 for both infusion passes and stacks the attention of
  every layer of every pass; without dropout/drop-path both give the same numbers (tested against
  their outputs), with drop-path the shared blocks draw one mask instead of three [I].
* **The cross-image memory** is model state: ``memory_bank`` (C, 30, D) holds each class's last 30
  LayerNorm-ed foreground tokens (oldest first, right-aligned), ``memory_count`` (C,) how many are
  valid. Both are buffers, so checkpoints carry them and a resumed run continues exactly; under DDP
  every rank appends the gathered entries of the whole global batch in the single-process order.
* ``pos_embed`` (1, 1+M, D): the unused ViT position embedding their files carry, kept as a buffer so
  that their checkpoints convert both ways bit for bit.

Their checkpoint layout (a bare state dict) converts in :mod:`tokenseg.methods.cti.convert`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import TokensegError
from ...models.attention import run_blocks
from ...models.classtoken import ClassTokenViT, MapOutputs, pool_patch_scores

# the keys only CTI's layout has (their ``MCTformerV2_CTI``)
CTI_KEYS = ("bg_token", "tokenizer.0.weight", "tokenizer.0.bias", "tokenizer.2.weight", "tokenizer.2.bias")
MEMORY_KEYS = ("memory_bank", "memory_count")
MEMORY_LN_EPS = 1e-5  # their F.layer_norm(token, [D]) with PyTorch's default eps, no affine


@dataclass(frozen=True)
class CTIPlan:
    """What one training forward computes; :func:`tokenseg.methods.cti.method.plan_for` derives it from the
    config and the epoch (losses switched off skip their passes, as their ``update()``)."""

    bg: bool = True  # view 1's training-time attention (the BG-CAM loss)
    intra: bool = True  # the intra-image infusion pass
    cross: bool = True  # the memory update and the cross-image infusion pass
    swap: int = 3  # their swap_idx: tokens after block ``swap`` are infused at the input of block swap + 1
    attn_layers: int = 6  # class-to-patch attention summed over the last N layers (their n_layers=6)
    affinity_from: int = 4  # patch affinity summed over layers affinity_from.. (their patch_attn[swap_idx+1:])
    layer_tokens: bool = False  # keep view 1's foreground tokens after every block (``cti.cct_weight``)
    view2: bool = True  # False: the step is view 1's plain pass alone (before cti.start_epoch with cti.view2_from_start_epoch)


@dataclass
class CTIMapOutputs(MapOutputs):
    """:class:`MapOutputs` of the C foreground classes plus the background token's maps."""

    bg_attention: torch.Tensor | None = None  # (B, 1, h, w) background-token-to-patch attention
    bg_patchcam: torch.Tensor | None = None  # (B, 1, h, w) ReLU of the PatchCAM's channel 0


class CTIViT(ClassTokenViT):
    """ClassTokenViT with CTI's tokenizer, background token, (C+1)-way PatchCAM and token memory."""

    def __init__(self, backbone: nn.Module, num_classes: int, train_grid: tuple[int, int], memory_size: int = 30,
                 distinct_init: bool = False, final_norm: bool = False, pos_resize: str = "auto",
                 pooling: str = "gap", gwrp_decay: float = 0.996) -> None:
        # C + 1 prefix rows: the parent makes pos_embed_cls ((C+1)×D, the pretrained class position
        # embedding repeated C + 1 times as their ``finetune`` path) and the (C+1)-output head
        super().__init__(backbone, num_classes + 1, train_grid, patch_head=True, pooling=pooling,
                         gwrp_decay=gwrp_decay, pos_resize=pos_resize, distinct_init=distinct_init,
                         final_norm=final_norm, decay_pos_embed=True)
        C, D = num_classes, self.embed_dim
        self.num_classes = C
        del self.cls_tokens  # one foreground token instead of C class tokens
        self.cls_token = nn.Parameter(backbone.cls_token.detach().clone().reshape(1, 1, D))
        if distinct_init:  # from scratch: their VisionTransformer's trunc_normal(0.02) (timm draws ~1e-6)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.bg_token = nn.Parameter(torch.zeros(1, 1, D))
        # their literal nn.Linear(384, 384*5) is D -> 5D for DeiT-S; PyTorch's default init (it is
        # created after their _init_weights ran), as is the head's (§16.8)
        self.tokenizer = nn.Sequential(nn.Linear(D, 5 * D), nn.ReLU(), nn.Linear(5 * D, D * (C + 1)))
        self.head.reset_parameters()
        self.register_buffer("pos_embed", backbone.pos_embed.detach().clone())
        self.register_buffer("memory_bank", torch.zeros(C, memory_size, D))
        self.register_buffer("memory_count", torch.zeros(C, dtype=torch.long))

    # ------------------------------------------------------------------ tokens
    @property
    def num_prefix(self) -> int:
        return self.num_classes + 1

    @property
    def memory_size(self) -> int:
        return self.memory_bank.shape[1]

    def prefix_tokens(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """tokenizer(t_fg) + [t_bg, t_fg × C] + pos_embed_cls, the same for every image. The MLP runs on
        ``batch`` copies as theirs (a one-row product rounds differently; the cost is negligible)."""
        C, D = self.num_classes, self.embed_dim
        made = self.tokenizer(self.cls_token.reshape(1, D).expand(batch, D)).view(batch, C + 1, D)
        base = torch.cat([self.bg_token, self.cls_token.expand(1, C, D)], dim=1)
        return (made + base + self.pos_embed_cls).to(dtype)

    def no_weight_decay(self) -> set[str]:
        """Their skip list is timm's {'pos_embed', 'cls_token'} (+ 1-D parameters): ``bg_token``, the
        position embeddings and the tokenizer are decayed (§16.3); ``pos_embed`` is a buffer here."""
        return {"cls_token"}

    def _heads(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class logits (B, C), patch logits (B, C), PatchCAM logits (B, C+1, h, w)); the patch logits
        pool channels 1..C with ``self.pooling`` (their GAP; ``cti.pooling``)."""
        B, N, D = tokens.shape
        _, fg, pat = tokens.split([1, self.num_classes, N - self.num_prefix], dim=1)
        fmap = self.head(pat.transpose(1, 2).reshape(B, D, grid[0], grid[1]))
        return fg.float().mean(-1), pool_patch_scores(fmap[:, 1:], self.pooling, self.gwrp_decay), fmap

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, x_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                plan: CTIPlan | None = None, return_layer_tokens: bool = False) -> dict:
        """``forward(x)``: one plain pass (fused attention): ``cls_logits``, ``patch_logits``,
        ``patch_map`` (C+1 channels), ``tokens``, ``grid``. ``forward(x, x_pos, labels, plan)``: the
        whole training step's passes (:meth:`forward_train`)."""
        if x_pos is None:
            tokens, grid = self.embed(x)
            res = run_blocks(self.blocks, tokens, self.num_prefix, keep_layer_tokens=return_layer_tokens)
            tokens = self.output_norm(res.tokens)
            cls, pcls, fmap = self._heads(tokens, grid)
            out = {"cls_logits": cls, "patch_logits": pcls, "patch_map": fmap, "tokens": tokens, "grid": grid}
            if return_layer_tokens:
                out["layer_cls_tokens"] = [t[:, 1:] for t in res.layer_tokens]
            return out
        if labels is None:
            raise ValueError("the CTI training forward needs the labels (memory bank, cross infusion)")
        return self.forward_train(x, x_pos, labels, plan or CTIPlan())

    def forward_train(self, x: torch.Tensor, x_pos: torch.Tensor, labels: torch.Tensor, plan: CTIPlan) -> dict:
        """Every pass of their ``update()`` for views ``x`` and ``x_pos`` (same size) and multi-hot labels.

        Returns view 1's ``cls_logits``, ``patch_logits``, ``patch_map``, ``tokens``, ``grid``, ``cams``
        (ReLU of the (C+1)-way PatchCAM) and ``ctk3`` (tokens after block ``swap``); with ``plan.bg``
        ``mtatt`` (B, C+1, h, w) and ``attn`` (B, M, M) (training-time layers); view 2's
        ``cls_logits_pos``, ``patch_logits_pos``, ``ctk3_pos``; with ``plan.intra`` ``cams_swap_intra``;
        with ``plan.cross`` ``memory_full`` (every class holds ``memory_size`` entries after this
        batch's) and, when it is, ``swap_ctk_cross`` and ``fcams_as_swap_cross``."""
        if x.shape != x_pos.shape:
            raise ValueError(f"the two views must have one size, got {tuple(x.shape)} and {tuple(x_pos.shape)}")
        B, P, L, s = x.shape[0], self.num_prefix, len(self.blocks), plan.swap
        if not 0 <= s < L - 1:
            raise TokensegError(f"cti.swap_layer={s}: the backbone has {L} blocks, so it must be in 0..{L - 2} "
                                f"(a block must follow the infusion)")
        row_layers = set(range(max(L - plan.attn_layers, 0), L)) if plan.bg else set()
        full_layers = set(range(max(plan.affinity_from, 0), L)) if plan.bg else set()

        # blocks 0..swap: both views in one batch (view 2's taps, if any, are dropped). Tokens are cut
        # with split(), whose backward is one concatenation (a slice's backward fills a zero tensor of
        # the full size for every slice taken)
        tokens, grid = self.embed(torch.cat([x, x_pos]))
        M = tokens.shape[1] - P
        head = run_blocks(self.blocks, tokens, P, row_layers={i for i in row_layers if i <= s},
                          full_layers={i for i in full_layers if i <= s}, stop=s + 1, grad=True,
                          keep_layer_tokens=plan.layer_tokens)
        x3, x3_pos = head.tokens.split(B)
        # view 1 on its own, explicit attention only where the BG-CAM loss reads it
        v1 = run_blocks(self.blocks, x3, P, row_layers={i for i in row_layers if i > s},
                        full_layers={i for i in full_layers if i > s}, start=s + 1, grad=True,
                        keep_layer_tokens=plan.layer_tokens)
        pre, pat = x3.split([P, M], dim=1)
        pre_pos, pat_pos = x3_pos.split([P, M], dim=1)
        out: dict[str, Any] = {"ctk3": pre, "ctk3_pos": pre_pos, "grid": grid}
        if plan.layer_tokens:  # view 1's foreground tokens after every block
            out["layer_cls_tokens"] = [t[:B, 1:] for t in head.layer_tokens] + [t[:, 1:] for t in v1.layer_tokens]

        # view 2's continuation and the infusion passes from the shared block-`swap` tokens, one batch
        prefixes, patches, names = [pre_pos], [pat_pos], ["pos"]
        if plan.intra:  # all C + 1 tokens averaged with view 2's (not detached)
            prefixes.append((pre + pre_pos) / 2)
            patches.append(pat)
            names.append("intra")
        cross = False
        if plan.cross:
            bg, fg = pre.split([1, P - 1], dim=1)
            out["memory_full"] = cross = self.update_memory(fg.detach(), labels)
            if cross:  # [I] their pass also runs while the memory fills, but its loss is not added then
                y = labels.to(fg.dtype)[..., None]
                swap = (fg * (1 - y) + self.global_tokens().to(fg.dtype) * y).detach()
                out["swap_ctk_cross"] = swap
                prefixes.append(torch.cat([bg, (fg + swap) / 2], dim=1))
                patches.append(pat)
                names.append("cross")
        batch = torch.cat([torch.cat(prefixes), torch.cat(patches)], dim=1)
        rest = run_blocks(self.blocks, batch, P, row_layers=range(s + 1, L) if cross else (), start=s + 1,
                          grad=True)

        h, w = grid
        tokens1 = self.output_norm(v1.tokens)
        cls, pcls, fmap = self._heads(tokens1, grid)
        out.update(cls_logits=cls, patch_logits=pcls, patch_map=fmap, tokens=tokens1, cams=F.relu(fmap))
        cls_r, pcls_r, fmap_r = self._heads(self.output_norm(rest.tokens), grid)
        maps_r = fmap_r.split(B)
        out.update(cls_logits_pos=cls_r[:B], patch_logits_pos=pcls_r[:B])
        if plan.bg:
            rows = _add(head.rows[:B] if head.rows is not None else None, v1.rows)
            full = _add(head.full[:B] if head.full is not None else None, v1.full)
            out["mtatt"] = rows[:, :, P:].reshape(B, P, h, w)
            out["attn"] = full[:, P:, P:]
        for k, name in enumerate(names[1:], start=1):
            cams = F.relu(maps_r[k])
            if name == "intra":
                out["cams_swap_intra"] = cams
            else:
                mtatt_as = rest.rows[k * B:(k + 1) * B, :, P:].reshape(B, P, h, w)
                out["fcams_as_swap_cross"] = cams * mtatt_as
        return out

    # ------------------------------------------------------------------ memory
    @torch.no_grad()
    def update_memory(self, fg_tokens: torch.Tensor, labels: torch.Tensor) -> bool:
        """Append LayerNorm(token of class c in image b) for every present (b, c) — gathered over DDP
        ranks first, in the single-process batch order — keep each class's last ``memory_size``; returns
        whether every class now holds ``memory_size`` entries (their ``valid == C``)."""
        entries = F.layer_norm(fg_tokens.float(), (fg_tokens.shape[-1],), eps=MEMORY_LN_EPS)
        present = labels > 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            entries, present = _gather_batch(entries, present)
        bank, count = append_memory(self.memory_bank, self.memory_count, entries, present)
        self.memory_bank.copy_(bank)
        self.memory_count.copy_(count)
        return bool((count >= self.memory_size).all())

    def global_tokens(self) -> torch.Tensor:
        """(C, D): each class's mean memory token (zeros for a class with no entry yet)."""
        M = self.memory_size
        valid = torch.arange(M, device=self.memory_bank.device) >= (M - self.memory_count)[:, None]
        total = (self.memory_bank * valid[..., None]).sum(1)
        return total / self.memory_count.clamp(min=1)[:, None].to(total.dtype)

    def reset_memory(self) -> None:
        self.memory_bank.zero_()
        self.memory_count.zero_()

    # ------------------------------------------------------------------ maps
    @torch.no_grad()
    def forward_maps(self, x: torch.Tensor, last_k: int, affinity: bool, layer_reduce: str = "sum",
                     affinity_layers: int = 0) -> CTIMapOutputs:
        """Their inference maps: class-to-patch attention of all C + 1 rows over the last ``last_k``
        layers (their ``n_layers=12``, summed), ReLU of the (C+1)-way PatchCAM, and the patch affinity
        summed over the last ``affinity_layers`` layers (0 = all, their inference). Explicit attention
        only in those layers; foreground maps as :class:`MapOutputs`, the background token's apart."""
        tokens, grid = self.embed(x)
        P = self.num_prefix
        tokens, rows, affinity_map = self.map_pass(tokens, P, last_k, affinity, layer_reduce, affinity_layers)
        att = rows.reshape(x.shape[0], P, *grid)
        pc = F.relu(self.patch_logits_map(tokens, grid).float())
        return CTIMapOutputs(attention=att[:, 1:], patchcam=pc[:, 1:], affinity=affinity_map,
                             cls_logits=tokens[:, 1:P].float().mean(-1), grid=grid,
                             bg_attention=att[:, :1], bg_patchcam=pc[:, :1])


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def append_memory(bank: torch.Tensor, count: torch.Tensor, entries: torch.Tensor, present: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory after appending ``entries[b, c]`` for every ``present[b, c]`` in image order, keeping
    each class's last M. ``bank`` (C, M, D) is right-aligned (valid entries at [M - count, M), oldest
    first), ``entries`` (B, C, D), ``present`` (B, C) bool. One gather for all classes: slot p of class c
    takes old slot p + k_c while that exists, else the (p + k_c − M)-th new entry of c (k_c new ones)."""
    C, M, D = bank.shape
    B = present.shape[0]
    k = present.sum(0)  # (C,) new entries per class
    # per class, the images holding it first, in image order (a stable sort of "absent")
    order = torch.sort((~present).to(torch.int8), dim=0, stable=True).indices.T  # (C, B)
    src = torch.arange(M, device=bank.device)[None, :] + k[:, None]  # (C, M)
    from_old = src < M
    old = bank.gather(1, src.clamp(max=M - 1)[..., None].expand(C, M, D))
    image = order.gather(1, (src - M).clamp(0, max(B - 1, 0)))  # (C, M)
    new = entries[image, torch.arange(C, device=bank.device)[:, None]].to(bank.dtype)  # (C, M, D)
    return torch.where(from_old[..., None], old, new), (count + k).clamp(max=M)


def _gather_batch(entries: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (B_r, C, D) entries and (B_r, C) labels, in the order one process would see the
    global batch: DistributedSampler gives rank r the global positions r, r + W, ... of each step."""
    world = dist.get_world_size()
    parts_e = [torch.empty_like(entries) for _ in range(world)]
    pres = present.to(torch.float32)
    parts_p = [torch.empty_like(pres) for _ in range(world)]
    dist.all_gather(parts_e, entries.contiguous())
    dist.all_gather(parts_p, pres.contiguous())
    e = torch.stack(parts_e, 1).flatten(0, 1)  # (B_r, W, ...) -> position j * W + r
    p = torch.stack(parts_p, 1).flatten(0, 1) > 0
    return e, p


# ---------------------------------------------------------------------------------------- building
def build_cti_model(cfg, num_classes: int) -> CTIViT:
    """The CTI model for ``cfg.model`` (any timm ViT backbone; weights as ``model.pretrained`` says)."""
    from ...models import vit_backbone

    m = cfg.model
    pretrained = m.pretrained
    backbone, grid = vit_backbone(m)
    distinct = m.token_init == "independent" or (m.token_init == "auto" and not pretrained)
    return CTIViT(backbone, num_classes, grid, memory_size=cfg.cti.memory_size, distinct_init=distinct,
                  final_norm=m.final_norm, pooling=cfg.cti.pooling, gwrp_decay=m.gwrp_decay)


__all__ = ["CTIViT", "CTIPlan", "CTIMapOutputs", "CTI_KEYS", "MEMORY_KEYS", "append_memory", "build_cti_model"]
