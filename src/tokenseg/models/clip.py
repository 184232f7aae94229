"""CLIP towers for the training-free CLIP-ES seeds: loading, text features, the visual forward.

The towers are open_clip's modules (``pip install "tokenseg[clip]"``); no CLIP copy is vendored.
Weights come from OpenAI's release (``ViT-B-16.pt``, a TorchScript archive, or its state_dict), from
an open_clip checkpoint (a file, a pretrained tag such as ``laion2b_s34b_b88k``, or ``hf-hub:...``),
or are downloaded when online. Whatever the source, the result is a :class:`ClipModel`: the open_clip
``VisionTransformer`` plus, when the weights have one, the text side of the open_clip ``CLIP``.

The visual forward here is split into the pieces CLIP-ES needs (embedding with a resized position
grid, the no-gradient blocks with explicit attention only where asked, the last block's parts), so that
:mod:`tokenseg.methods.clip_es.gradcam` can run the last block once for all classes' Grad-CAMs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..core.errors import TokensegError
from ..core.weights import unwrap_state_dict


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_ARCH = "ViT-B-16"
# Keys that OpenAI's TorchScript state dict carries as tensors but are not parameters, and the
# position grid that CLIP-ES's own model keeps as an attribute after a forward (their state_dict
# therefore holds the grid of the last image they ran) — neither is a weight.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "visual.positional_embedding_new")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class _QuietNoWeights(logging.Filter):
    """open_clip logs "No pretrained weights loaded" when we build a model to load a file into."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_empty(oc, arch: str, quick_gelu: bool | None):
    root = logging.getLogger()
    flt = _QuietNoWeights()
    root.addFilter(flt)
    try:
        return oc.create_model(arch, pretrained=None, force_quick_gelu=bool(quick_gelu))
    finally:
        root.removeFilter(flt)


def require_open_clip():
    """Import open_clip lazily: it is an optional extra."""
    try:
        import open_clip
    except ImportError as exc:
        raise TokensegError('CLIP-ES needs open_clip (open-clip-torch): pip install "tokenseg[clip]"') from exc
    return open_clip


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class ClipModel(nn.Module):
    """An open_clip vision tower (``visual``) and, optionally, the text side (``text``: the open_clip
    ``CLIP`` with its ``visual`` replaced by an Identity, so the tower is not held twice).

    ``logit_scale`` is the log of CLIP's temperature (OpenAI: log 100) as a buffer."""

    def __init__(self, visual: nn.Module, text: nn.Module | None, logit_scale: float,
                 image_mean: Sequence[float] = OPENAI_MEAN, image_std: Sequence[float] = OPENAI_STD,
                 tokenizer_name: str | None = None, source: str = "") -> None:
        super().__init__()
        check_visual(visual, source)
        self.visual = visual
        self.text = text
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.tokenizer_name = tokenizer_name
        self.source = source
        self._tokenizer = None
        self._fingerprint: str | None = None

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    @property
    def num_layers(self) -> int:
        return len(self.visual.transformer.resblocks)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """open_clip's tokenizer for this model (the bundled BPE for OpenAI/LAION ViTs: works offline)."""
        if self._tokenizer is None:
            oc = require_open_clip()
            if self.tokenizer_name:
                self._tokenizer = oc.get_tokenizer(self.tokenizer_name)
            else:
                ctx = int(getattr(self.text, "context_length", 77)) if self.text is not None else 77
                self._tokenizer = oc.tokenizer.SimpleTokenizer(context_length=ctx)
        return self._tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.text is None:
            raise TokensegError(f"{self.source or 'these CLIP weights'}: no text tower, so text features cannot "
                                f"be computed; load full CLIP weights (e.g. OpenAI's ViT-B-16.pt)")
        return self.text.encode_text(tokens)

    def visual_in(self, dtype: torch.dtype) -> nn.Module:
        """The vision tower with its products in ``dtype``: itself for fp32, else a copy cast once
        (:func:`cast_visual`) and kept for later calls on the same device."""
        if dtype == torch.float32:
            return self.visual
        dev = self.visual.conv1.weight.device
        cache = self.__dict__.setdefault("_lowp", {})
        if (dtype, dev) not in cache:
            import copy

            cache.clear()
            cache[(dtype, dev)] = cast_visual(_fold_quick_gelu(copy.deepcopy(self.visual)), dtype)
        return cache[(dtype, dev)]

    def fingerprint(self) -> str:
        """A hash of the text side (weights, dtype, tokenizer): the key of cached text features."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(json.dumps({"tokenizer": self.tokenizer_name or "bpe"}).encode())
            if self.text is not None:
                for name, t in sorted(self.text.state_dict().items()):
                    t = t.detach().cpu().contiguous()
                    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def check_visual(visual: nn.Module, source: str = "") -> None:
    """CLIP-ES needs a plain ViT tower (patch conv, class token, learnt positions, standard blocks)."""
    where = source or "CLIP model"
    oc = require_open_clip()
    if not isinstance(visual, oc.transformer.VisionTransformer):
        raise TokensegError(f"{where}: CLIP-ES needs an open_clip ViT vision tower, got {type(visual).__name__} "
                            f"(ResNet and timm towers have no token grid with ln_1/attention to hook)")
    if getattr(visual, "attn_pool", None) is not None:
        raise TokensegError(f"{where}: vision towers with an attentional pooler are not supported")
    for i, blk in enumerate(visual.transformer.resblocks):
        attn = getattr(blk, "attn", None)
        mlp = getattr(blk, "mlp", None)
        if (not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.bias_k is not None
                or mlp is None or [n for n, _ in mlp.named_children()] != ["c_fc", "gelu", "c_proj"]):
            raise TokensegError(f"{where}: block {i} is not a standard CLIP attention block "
                                f"(custom open_clip blocks are not supported)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_clip(pretrained: str | os.PathLike | bool | None, arch: str | None = None, *,
              quick_gelu: bool | None = None, cache_dir: str | os.PathLike | None = None,
              device: str | torch.device = "cpu") -> ClipModel:
    """Load CLIP weights into open_clip modules, frozen, in eval mode, fp32.

    ``pretrained``:
      * a file: OpenAI's TorchScript ``ViT-B-16.pt``, a state_dict (``.pt``/``.pth``/``.bin``, optionally
        under ``state_dict``/``model``, ``module.`` prefixes stripped) or ``.safetensors``. With ``arch``
        unset the architecture is read from the tensor shapes (OpenAI layout, QuickGELU as OpenAI
        trained it); with ``arch`` (an open_clip config name, e.g. ``ViT-B-16`` for LAION weights,
        GELU) open_clip's config is used.
      * ``True`` / ``"openai"``: OpenAI's weights for ``arch`` (default ViT-B-16), downloaded into
        ``cache_dir`` once (offline: a clear error saying which file to fetch);
      * an open_clip pretrained tag (``laion2b_s34b_b88k``) or ``hf-hub:org/repo``: via open_clip.
    ``quick_gelu``: force the activation (None: as described above)."""
    oc = require_open_clip()
    arch = arch if arch not in (None, "", "auto") else None
    if pretrained in (None, False, ""):
        raise TokensegError("model.pretrained: CLIP-ES needs CLIP weights: a file (OpenAI's ViT-B-16.pt, an "
                            "open_clip checkpoint), true (download OpenAI's), or an open_clip tag")
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() == "openai"):
        path = _download_openai(arch or DEFAULT_ARCH, cache_dir)
        model = _load_file(path, arch, True if quick_gelu is None else quick_gelu)
    else:
        text = os.fspath(pretrained)
        path = Path(text).expanduser()
        if path.is_dir():
            raise TokensegError(f"model.pretrained: {path} is a folder; give the weights file inside it")
        if path.is_file():
            model = _load_file(path, arch, quick_gelu)
        elif text.startswith("hf-hub:") or not (os.sep in text or text.lower().endswith(_WEIGHT_SUFFIXES)):
            model = _load_open_clip_tag(oc, text, arch or DEFAULT_ARCH, quick_gelu, cache_dir)
        else:
            raise TokensegError(f"model.pretrained: weights file {path} not found")
    return model.to(device)


def _download_openai(arch: str, cache_dir: str | os.PathLike | None) -> Path:
    oc = require_open_clip()
    url = oc.pretrained.get_pretrained_url(arch, "openai")
    if not url:
        raise TokensegError(f"model.backbone={arch!r}: open_clip has no OpenAI weights for it "
                            f"(known: {oc.list_openai_models()})")
    root = Path(cache_dir).expanduser() / "clip" if cache_dir else None
    from ..core.hub import require_url_download

    require_url_download(url, (root or Path("~/.cache/clip").expanduser()) / url.rsplit("/", 1)[-1],
                         "model.pretrained")
    try:
        return Path(oc.pretrained.download_pretrained_from_url(url, cache_dir=str(root) if root else None))
    except Exception as exc:  # URLError, HTTPError, timeouts, checksum mismatches
        raise TokensegError(
            f"model.pretrained=true: could not download OpenAI's {arch} weights from {url} "
            f"({type(exc).__name__}: {exc}). Offline, fetch that file elsewhere and set "
            f"model.pretrained=/path/to/{url.rsplit('/', 1)[-1]}") from exc


def _load_open_clip_tag(oc, tag: str, arch: str, quick_gelu: bool | None,
                        cache_dir: str | os.PathLike | None) -> ClipModel:
    name, pretrained = (tag, None) if tag.startswith("hf-hub:") else (arch, tag)
    if pretrained is not None and pretrained not in oc.list_pretrained_tags_by_model(arch):
        raise TokensegError(f"model.pretrained={tag!r}: neither a file nor an open_clip pretrained tag for "
                            f"{arch} (tags: {oc.list_pretrained_tags_by_model(arch)})")
    try:
        m = oc.create_model(name, pretrained=pretrained, force_quick_gelu=bool(quick_gelu),
                            cache_dir=str(Path(cache_dir).expanduser() / "clip") if cache_dir else None)
    except Exception as exc:
        raise TokensegError(
            f"model.pretrained={tag!r}: open_clip could not load {name} ({type(exc).__name__}: {exc}). "
            f"Offline, download the checkpoint elsewhere and set model.pretrained=/path/to/file "
            f"model.backbone={arch}") from exc
    return _wrap(m, source=tag, tokenizer_name=name)


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of a CLIP checkpoint file and whether it was a TorchScript archive (OpenAI's release).

    TorchScript archives are read with ``torch.jit.load`` (TorchScript code, not pickled Python);
    everything else tensors-only (``weights_only``)."""
    path = Path(path)
    scripted = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif _is_torchscript(path):
            scripted = True
            with warnings.catch_warnings():  # torch.jit.load is deprecated, OpenAI's release is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read CLIP weights ({type(exc).__name__}: {exc})") from exc
    sd = unwrap_state_dict(sd, f"{path} (CLIP weights)")
    return {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}, scripted


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _load_file(path: Path, arch: str | None, quick_gelu: bool | None) -> ClipModel:
    sd, scripted = read_clip_state_dict(path)
    if scripted and quick_gelu is None:
        quick_gelu = True  # OpenAI's archives are OpenAI's models: QuickGELU
    if arch is None:
        model = _build_from_shapes(sd, path, True if quick_gelu is None else quick_gelu)
        return model
    oc = require_open_clip()
    try:
        m = _create_empty(oc, arch, quick_gelu)
    except Exception as exc:
        raise TokensegError(f"model.backbone={arch!r}: not an open_clip model config ({exc})") from exc
    _load_strict(m, sd, path)
    return _wrap(m, source=str(path), tokenizer_name=arch)


def _build_from_shapes(sd: dict[str, torch.Tensor], path: Path, quick_gelu: bool) -> ClipModel:
    """OpenAI-layout weights → open_clip modules, the architecture read from the tensor shapes (as
    OpenAI's ``build_model`` does: 64-wide heads). A file with only ``visual.*`` (and ``logit_scale``)
    gives a vision-only model."""
    oc = require_open_clip()
    if "visual.proj" not in sd or "visual.conv1.weight" not in sd:
        raise TokensegError(f"{path}: not a CLIP ViT checkpoint (no visual.proj / visual.conv1.weight; "
                            f"ResNet CLIP towers are not supported by CLIP-ES)")
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    embed_dim = sd["visual.proj"].shape[1]
    heads = max(1, width // 64)  # OpenAI's rule (their build_model)
    vision_cfg = oc.model.CLIPVisionCfg(layers=layers, width=width, patch_size=patch, image_size=patch * grid,
                                        head_width=width // heads)
    has_text = "text_projection" in sd
    if has_text:
        tw = sd["ln_final.weight"].shape[0]
        text_cfg = oc.model.CLIPTextCfg(
            context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
            width=tw, heads=max(1, tw // 64),
            layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))
        m = oc.model.CLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
        _load_strict(m, sd, path)
        return _wrap(m, source=str(path))
    act = oc.transformer.QuickGELU if quick_gelu else nn.GELU
    visual = oc.transformer.VisionTransformer(
        image_size=patch * grid, patch_size=patch, width=width, layers=layers,
        heads=heads, mlp_ratio=4.0, output_dim=embed_dim, act_layer=act,
        norm_layer=oc.transformer.LayerNorm)
    vsd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    _load_strict(visual, vsd, path, prefix="visual.")
    scale = float(sd["logit_scale"]) if "logit_scale" in sd else math.log(100.0)
    return _finish(ClipModel(visual, None, scale, source=str(path)))


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    """Load all of ``sd`` (keys without ``prefix``); errors name the file's keys."""
    own = module.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise TokensegError(f"{path}: shapes differ from the model for {[prefix + k for k in bad[:5]]} (e.g. "
                            f"{prefix}{bad[0]}: file {tuple(sd[bad[0]].shape)}, model {tuple(own[bad[0]].shape)})")
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [prefix + k for k in missing if k != "logit_bias"]
    unexpected = [prefix + k for k in unexpected]
    if missing or unexpected:
        raise TokensegError(f"{path}: does not match the CLIP model: missing {missing[:5]}"
                            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{'...' if len(unexpected) > 5 else ''}")


def _wrap(m: nn.Module, source: str, tokenizer_name: str | None = None) -> ClipModel:
    visual = m.visual
    mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_STD
    scale = float(m.logit_scale.detach().reshape(-1)[0]) if getattr(m, "logit_scale", None) is not None \
        else math.log(100.0)
    m.visual = nn.Identity()
    return _finish(ClipModel(visual, m, scale, mean, std, tokenizer_name=tokenizer_name, source=source))


def _finish(model: ClipModel) -> ClipModel:
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_clip(arch: str = DEFAULT_ARCH, seed: int = 0, text: bool = False, quick_gelu: bool = True) -> ClipModel:
    """A randomly initialised open_clip model (benchmarks, tests): no file, no network."""
    oc = require_open_clip()
    torch.manual_seed(seed)
    m = _create_empty(oc, arch, quick_gelu)
    model = _wrap(m, source=f"random:{arch}:{seed}", tokenizer_name=arch)
    if not text:
        model.text = None
    return model


def _fold_quick_gelu(visual: nn.Module) -> nn.Module:
    """QuickGELU ``h·σ(1.702h)`` = ``SiLU(1.702h)/1.702``: fold both constants into c_fc / c_proj so
    the activation is one kernel (same function; used for the low-precision copy, where the three
    elementwise passes of QuickGELU cost ~10 % of the time on a CPU)."""
    oc = require_open_clip()
    for blk in visual.transformer.resblocks:
        if isinstance(blk.mlp.gelu, oc.transformer.QuickGELU):
            with torch.no_grad():
                blk.mlp.c_fc.weight.mul_(1.702)
                blk.mlp.c_fc.bias.mul_(1.702)
                blk.mlp.c_proj.weight.div_(1.702)
            blk.mlp.gelu = nn.SiLU()
    return visual


def cast_visual(visual: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the tower in place the way OpenAI's ``convert_weights`` does (what CLIP-ES runs on a GPU):
    convolution, linear, attention and projection weights to ``dtype``; LayerNorms and embeddings stay
    fp32. Our forward then computes the products in ``dtype`` and keeps the residual stream,
    LayerNorms and softmax inputs of the last block in fp32."""
    if dtype == torch.float32:
        return visual
    for mod in visual.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.weight.data = mod.weight.data.to(dtype)
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.to(dtype)
        if isinstance(mod, nn.MultiheadAttention):
            mod.in_proj_weight.data = mod.in_proj_weight.data.to(dtype)
            mod.in_proj_bias.data = mod.in_proj_bias.data.to(dtype)
    visual.proj.data = visual.proj.data.to(dtype)
    return visual
