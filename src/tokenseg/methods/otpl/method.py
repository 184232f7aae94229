"""OTPL — Optimal-Transport-assisted Proxy Learning (ICCV 2025; METHODS.md §12, the supplement's Eq. 13–19).

No public code exists: every choice the supplement leaves open is marked [I] here, in
:mod:`.proxies`, :mod:`.model` and in README "OTPL", and is an ``otpl.*`` option.

Two methods share the ``otpl`` config section:

* ``otpl`` — the class-token variant, ON a base method (``otpl.base``, default ``mctformer-plus``; any
  class-token base: ``cti`` once it exists). The base's model, forward, losses, views and map recipe are
  used through the registry (``get_method(base)``), never copied; OTPL adds, per image and in one batch:
  the base's class tokens Q and patch tokens F (its training forward returns ``tokens`` and ``grid``),
  the classifier CAM (its PatchCAM, background 1 − max), entropic OT between F and Q with the CAM-derived
  marginal, the top-K = 5 patches per class from the plan, proxies P_c = Conv(Concat[Q_c, H_c]), the
  proxy classification loss L_p.cls and the OT-assisted proxy–patch contrastive loss L_ppc (λ = 0.2,
  τ = 0.1): ``L = L_base + L_p.cls + λ·L_ppc``. Maps: the base's kinds, plus ``proxy`` (ReLU(cos(F, P_c)),
  max-normalised), ``otpl`` (the proxy CAM fused with a base map, geometric mean by default) and their
  patch-affinity refinements ``proxy_affinity`` / ``otpl_affinity`` (the default seeds).
* ``otpl-clip-es`` (:mod:`.clip_variant`) — the supplement's CLIP-ES variant: a plain ViT encoder (CLIP's image tower when
  given its weights), C + 1 prototypes Q = masked average pooling of its features under the CLIP-ES pseudo
  label (the argmax of precomputed CLIP-ES seed files, ``otpl.clip_seeds``, co-augmented with the image),
  the same OT, proxies and losses; maps: ``proxy``.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import ClassVar
from dataclasses import dataclass

import torch

from ...core.errors import TokensegError
from ...core.losses import multilabel_soft_margin
from .. import BACKGROUND, MapRecipe, Method, available_methods, get_method, register

OTPL_KINDS = ("proxy", "proxy_affinity", "otpl", "otpl_affinity")
CLIP_KINDS = ("proxy",)
AFFINITY = "_affinity"
OWN_METHODS = ("otpl", "otpl-clip-es")
FUSIONS = ("geometric", "arithmetic", "product", "max")


@dataclass
class OTPLConfig:
    """``otpl.*`` — [P] the supplement, [I] our reading where it is silent (README "OTPL")."""

    RANGES: ClassVar[dict] = {  # natural ranges, checked by config.validate_ranges
        "otpl.top_k": ">=1", "otpl.ppc_weight": ">=0", "otpl.tau": ">0", "otpl.pcls_weight": ">=0",
        "otpl.start_epoch": ">=0", "otpl.sinkhorn_eps": ">0", "otpl.sinkhorn_iters": ">=1",
        "otpl.marginal_mix": "[0,1]", "otpl.cam_bg_power": ">0", "otpl.proxy_kernel": ">=1",
        "otpl.proxy_weight_decay": ">=0", "otpl.clip_bg_power": ">0", "otpl.seed_stride": ">=1",
        "otpl.memory_momentum": "[0,1]", "otpl.encoder_trainable_blocks": ">=-1"}

    base: str = "mctformer-plus"  # the class-token method the proxies sit on (otpl only)
    top_k: int = 5  # [P Tab. A1] patches per class taken from the plan (Eq. 15)
    ppc_weight: float = 0.2  # λ [P Tab. A2]; 0 drops L_ppc (still logged as _ppc)
    tau: float = 0.1  # [I] temperature of L_ppc (not given anywhere)
    pcls_weight: float = 1.0  # [I] weight of L_p.cls (Eq. 12 adds it unweighted)
    ppc_reduce: str = "sum"  # sum (Eq. 19: per-class means summed over the image's classes) | mean [I]
    ppc_background: bool = False  # [I] Eq. 19 runs over the foreground classes only
    start_epoch: int = 0  # [I] epoch (0-based) from which L_p.cls and L_ppc count; the paper starts from
    # pretrained weights (0); from scratch the CAM/plan positives are noise at first (demo-otpl: 5)
    ppc_features: str = "train"  # L_ppc's gradient into the patch features: train (the paper: Eq. 12 trains
    # the network on the sum, features included) | detach [I] (only the proxies, hence the class tokens and
    # the proxy conv, move; the from-scratch demo's choice: there `train` wrecked the base, val mAP 38
    # instead of 91, seeds 19 instead of 47 — README "OTPL")
    sinkhorn_eps: float = 0.1  # [I] ε, as POT (same authors)
    sinkhorn_iters: int = 50  # [I] fixed iterations, no host sync (POT's code: at most 100, stops at
    # mean |Δr| < 1e-2, which these problems reach in far fewer; see README "OTPL")
    columns: str = "all"  # [I] OT columns: all (every class, masses from the CAM without the labels:
    # label-free proxies) | present (the image's classes only, the spec's reading — the proxies then see
    # the labels and L_p.cls is solved by that; README "OTPL")
    marginal: str = "cam"  # cam (x_j ∝ Σ_i M^cls_ij) | uniform [I]
    marginal_mix: float = 0.0  # [I] blend of the uniform marginal into the CAM one (0 = CAM only)
    background: str = "auto"  # [I] background column of the OT: auto (otpl: the base's background token
    # if it has one, else none; otpl-clip-es: pooled) | token | pooled (masked average of the CAM's
    # background patches) | none (present classes only)
    cam: str = "auto"  # [I] the base output used as M^cls: auto (cam, else patch_map = PatchCAM logits)
    cam_norm: str = "max"  # [I] M^cls per class: max (ReLU, x/max: no class before the classifier fires) | minmax
    cam_bg_power: float = 1.0  # [I] M^cls background = (1 − max_c)^power
    proxy_kernel: int = 1  # [I] Conv kernel along D (1: a learned weighted sum of the K+1 tokens + bias)
    proxy_bias: bool = True
    proxy_weight_decay: float = 0.0  # [I] the proxy conv is initialised to the identity; decay would shrink it
    detach_selected: bool = False  # [I] no gradient through the top-K features H_c
    prototypes: str = "tokens"  # otpl: Q of the OT and the proxies — tokens (the base's output class tokens,
    # the paper) | pooled [I] (Eq. 13, the supplement's prototypes for a base whose tokens cannot serve:
    # the masked average of the patch features under the classifier CAM's argmax, per image; a class with
    # no such patch keeps its class token; background column `auto` -> pooled). The from-scratch demo's
    # choice: there the class tokens do not point at their objects in patch-feature space (README "OTPL")
    # maps (otpl): the proxy CAM fused with a base map before the patch-affinity refinement
    fusion: str = "geometric"  # [I] geometric (sqrt(a·p)) | arithmetic | product | max
    fuse_with: str = "fused"  # the base map kind (without _affinity) the proxy CAM is fused with
    fuse_normalise: bool = True  # [I] max-normalise the base map per view before fusing
    # CLIP-ES variant (otpl-clip-es)
    clip_seeds: str = ""  # folder of CLIP-ES seed files (.npz/.npy) of the train split
    clip_bg_power: float = 1.0  # background of seeds without one: (1 − max)^power (CLIP-ES's α = 1)
    seed_stride: int = 4  # seeds travel with the crop at img_size / seed_stride, pooled to the grid
    detach_prototypes: bool = False  # [I] no gradient through the masked average pooling of Q (CLIP-ES
    # variant, and otpl with prototypes=pooled)
    memory_momentum: float = 0.9  # [I] EMA of the class prototypes used where an image has no seeds
    encoder_trainable_blocks: int = -1  # -1 all, 0 frozen encoder, n: the last n blocks (+ final norm)


# ------------------------------------------------------------------------------------------ the base
def base_method(cfg) -> Method:
    name = cfg.otpl.base
    if name in OWN_METHODS:
        raise TokensegError(f"otpl.base={name}: OTPL needs a class-token base method (e.g. mctformer-plus)")
    try:
        base = get_method(name)
    except TokensegError as exc:
        raise TokensegError(f"otpl.base: {exc}") from None
    if not base.trainable:
        raise TokensegError(f"otpl.base={name}: {name} has no training losses; OTPL needs a trained class-token base")
    return base


def base_config(cfg, name: str):
    """``cfg`` as the base method sees it: ``maps.kinds`` its own kinds only. Shares every other section
    (a method's functions know which method they are: MCTformer's are bound to their variant)."""
    base = get_method(name)
    kinds = [k for k in cfg.maps.kinds if k in base.recipe.kinds] or list(base.recipe.default_kinds)
    return dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, kinds=kinds))


class _BaseForward:
    """The base method's training forward with the base's view of the config (picklable)."""

    def __init__(self, method: Method, cfg) -> None:
        self.method, self.cfg = method, cfg

    def __call__(self, model, batch, ctx):
        return self.method.forward(model, batch, ctx, self.cfg)


def build(cfg, num_classes: int):
    from .model import OTPLModel

    base = base_method(cfg)
    bcfg = base_config(cfg, base.name)
    inner = base.build(bcfg, num_classes)
    return OTPLModel(inner, base.name, _BaseForward(base, bcfg), num_classes, copy.deepcopy(cfg.otpl))


def forward(model, batch: dict, ctx, cfg) -> dict:
    return model(batch, ctx)  # one call of the (possibly DDP-wrapped) model: base forward + proxies inside


def otpl_terms(out: dict, labels: torch.Tensor, o: OTPLConfig, epoch: int = 0) -> dict[str, torch.Tensor]:
    """L_p.cls (Eq. 17: MLSM of mean_D(P_c), foreground proxies) and λ·L_ppc (Eq. 19); both weighted 0
    before ``otpl.start_epoch`` (0-based; computed all the same, so the graph does not change under DDP)."""
    from .proxies import proxy_patch_contrastive

    on = 1.0 if epoch >= o.start_epoch else 0.0
    proxies = out["otpl_proxies"]
    terms = {"otpl_pcls": on * o.pcls_weight * multilabel_soft_margin(proxies[:, 1:].float().mean(-1), labels)}
    feats = out["otpl_features"].detach() if o.ppc_features == "detach" else out["otpl_features"]
    args = (proxies, feats, out["otpl_positives"], o.tau, o.ppc_reduce)
    if o.ppc_weight > 0:
        ppc = proxy_patch_contrastive(*args)
        terms["otpl_ppc"] = on * o.ppc_weight * ppc
        terms["_ppc"] = ppc.detach()
    else:
        with torch.no_grad():
            terms["_ppc"] = proxy_patch_contrastive(*args)
    pos = out["otpl_positives"][:, 1:]
    cols = out["otpl_cols"][:, 1:]
    terms["_positives"] = (pos.sum(-1).float() * cols).sum().detach() / cols.sum().clamp_min(1)
    return terms


def loss(out: dict, batch: dict, ctx, cfg) -> dict[str, torch.Tensor]:
    base = base_method(cfg)
    terms = dict(base.loss(out, batch, ctx, base_config(cfg, base.name)))
    clash = [k for k in terms if k.startswith("otpl_")]
    if clash:
        raise TokensegError(f"otpl: the base {base.name!r} already has loss terms {clash}")
    terms.update(otpl_terms(out, batch["labels"], cfg.otpl, ctx.epoch if ctx is not None else 0))
    return terms


def class_scores(model, x: torch.Tensor) -> torch.Tensor:
    """The base's image-level scores (the proxies need the image's labels for their OT marginal)."""
    base = get_method(model.otpl_base)
    return base.class_scores(model.base, x) if base.class_scores else model.base(x)["cls_logits"]


def param_groups(model, cfg) -> list[dict]:
    base = base_method(cfg)
    groups = list(base.param_groups(model.base, base_config(cfg, base.name)))
    groups.append({"params": [p for p in model.proxy.parameters() if p.requires_grad],
                   "weight_decay": cfg.otpl.proxy_weight_decay, "lr_mult": 1.0})
    return groups


def views(cfg):
    base = base_method(cfg)
    return base.views(base_config(cfg, base.name))


def extras(cfg, dataset):
    base = base_method(cfg)
    if base.extras is None:
        return _no_extras
    return base.extras(base_config(cfg, base.name), dataset)


def _no_extras(i: int) -> dict:
    return {}


# ------------------------------------------------------------------------------------------ maps
class _Tap:
    """The base model as the base's own ``combine`` sees it; keeps what its ``forward_maps`` returned (the
    patch affinity, and the tokens if the base returns them), so OTPL needs no second explicit-attention
    pass and copies none of the base's map code."""

    def __init__(self, module) -> None:
        self._module = module
        self.captured = None

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def forward_maps(self, *args, **kwargs):
        self.captured = self._module.forward_maps(*args, **kwargs)
        return self.captured


def _affinity_kind(recipe: MapRecipe, fuse_with: str) -> str:
    want = fuse_with + AFFINITY
    if want in recipe.kinds:
        return want
    for k in recipe.kinds:
        if k.endswith(AFFINITY):
            return k
    raise TokensegError("otpl: the base's maps have no patch affinity (no *_affinity kind); use maps.kinds "
                        "without proxy_affinity / otpl_affinity")


def fuse(base_map: torch.Tensor, proxy: torch.Tensor, how: str, normalise: bool = True) -> torch.Tensor:
    """Fuse a base map with the proxy CAM (both (B, K, h, w), ≥ 0)."""
    if normalise:
        base_map = base_map / (base_map.flatten(2).amax(-1)[..., None, None] + 1e-5)
    if how == "geometric":
        return (base_map.clamp_min(0) * proxy).sqrt()
    if how == "arithmetic":
        return (base_map + proxy) / 2
    if how == "product":
        return base_map * proxy
    if how == "max":
        return torch.maximum(base_map, proxy)
    raise TokensegError(f"otpl.fusion must be one of {list(FUSIONS)}, got {how!r}")


MAP_TIME_KEYS = ("fusion", "fuse_with", "fuse_normalise")  # the otpl.* keys the map step reads from its own config
_WARNED: set[tuple[str, ...]] = set()


def warn_ignored_settings(o: OTPLConfig, trained, map_keys: tuple[str, ...] = MAP_TIME_KEYS) -> None:
    """One warning naming the ``otpl.*`` values given at map time that differ from the checkpoint's: the
    proxies were trained with (and the map step rebuilds them from) the checkpoint's, so only ``map_keys``
    (the variant's map-time keys) act there; anything else would be silently ignored."""
    if not isinstance(trained, OTPLConfig) or trained is o:
        return
    diff = tuple(f"otpl.{f.name}={getattr(o, f.name)!r} (checkpoint: {getattr(trained, f.name)!r})"
                 for f in dataclasses.fields(o) if f.name not in map_keys
                 and getattr(o, f.name) != getattr(trained, f.name))
    if diff and diff not in _WARNED:
        _WARNED.add(diff)
        warnings.warn(f"{', '.join(diff)}: a training setting; the maps use the checkpoint's value (only "
                      f"{', '.join('otpl.' + k for k in map_keys)} act at map time)", stacklevel=2)


def combine(model, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, cfg, kinds) -> dict:
    """The base's kinds from the base's own combine; ``proxy`` = ReLU(cos(F_i, P_c)) max-normalised,
    ``otpl`` = that fused with the base map ``otpl.fuse_with``, ``*_affinity`` = refined by the base's
    patch affinity (``A_ref[c, i] = Σ_j aff[i, j] A[c, j]``), all on the patch grid."""
    from .proxies import proxy_cam

    base = get_method(model.otpl_base)
    o = cfg.otpl
    warn_ignored_settings(o, getattr(model, "settings", None))
    own = [k for k in kinds if k in OTPL_KINDS]
    base_kinds = [k for k in kinds if k not in OTPL_KINDS]
    missing = [k for k in base_kinds if k not in base.recipe.kinds]
    if missing:
        raise TokensegError(f"maps.kinds: {', '.join(missing)} not made by this model's base {base.name!r} "
                            f"(it makes {', '.join(base.recipe.kinds)}, OTPL adds {', '.join(OTPL_KINDS)})")
    fused = any(k.startswith("otpl") for k in own)
    refine = any(k.endswith(AFFINITY) for k in own)
    call = list(base_kinds)
    if fused and o.fuse_with not in call:
        call.append(o.fuse_with)
    if refine and not any(k.endswith(AFFINITY) for k in call):
        call.append(_affinity_kind(base.recipe, o.fuse_with))
    tap = _Tap(model.base)
    made = base.recipe.combine(tap, x, labels, classes, base_config(cfg, base.name), call) if call else {}
    maps = {k: made[k] for k in base_kinds}
    for k in base_kinds:
        if k + BACKGROUND in made:
            maps[k + BACKGROUND] = made[k + BACKGROUND]
    if not own:
        return maps
    captured = tap.captured
    if getattr(captured, "tokens", None) is not None:
        out = {"tokens": captured.tokens, "grid": captured.grid, "patch_map": captured.patchcam}
    else:  # [I] one fused-attention forward for the tokens (forward_maps does not return them)
        out = model.base(x)
    prox = model.proxy_outputs(out, labels)
    gh, gw = out["grid"]
    cam = proxy_cam(prox["otpl_proxies"][:, 1:], prox["otpl_features"])[:, classes]
    cam = cam.view(x.shape[0], len(classes), gh, gw)
    own_maps = {"proxy": cam}
    if fused:
        own_maps["otpl"] = fuse(made[o.fuse_with].float(), cam, o.fusion, o.fuse_normalise)
    aff = getattr(captured, "affinity", None) if refine else None
    if refine and aff is None:
        raise TokensegError(f"otpl: the base {base.name!r} returned no patch affinity from forward_maps")
    for k in own:
        m = own_maps[k.removesuffix(AFFINITY)]
        if k.endswith(AFFINITY):
            m = (m.flatten(2) @ aff.float().transpose(1, 2)).view(m.shape)
        maps[k] = m
    return maps


def _token_kinds() -> set[str]:
    kinds = set()
    for name in available_methods():
        if name not in OWN_METHODS:
            kinds.update(get_method(name).recipe.kinds)
    return kinds


@dataclass(frozen=True)
class OnBaseRecipe(MapRecipe):
    """OTPL's kinds plus the base's, which depend on ``otpl.base``: checked against the base in
    :func:`validate` (config) and in :func:`combine` (the model's base)."""

    def check_kinds(self, kinds, source: str = "") -> None:
        bad = [k for k in kinds if k not in self.kinds and k not in _token_kinds()]
        if bad:
            raise TokensegError(f"{source + ': ' if source else ''}map kind(s) {', '.join(bad)} are not made by "
                                f"OTPL ({', '.join(self.kinds)}) nor by a base method")


def _check_common(o: OTPLConfig) -> None:
    def choice(key, value, options):
        if value not in options:
            raise TokensegError(f"config key 'otpl.{key}' must be one of {list(options)}, got {value!r}")

    if o.top_k < 1 or o.start_epoch < 0:
        raise TokensegError(f"otpl.top_k must be >= 1 and otpl.start_epoch >= 0, got {o.top_k}, {o.start_epoch}")
    if o.tau <= 0 or o.sinkhorn_eps <= 0:
        raise TokensegError(f"otpl.tau and otpl.sinkhorn_eps must be > 0, got {o.tau}, {o.sinkhorn_eps}")
    if o.sinkhorn_iters < 1:
        raise TokensegError(f"otpl.sinkhorn_iters must be >= 1, got {o.sinkhorn_iters}")
    if o.proxy_kernel < 1 or o.proxy_kernel % 2 == 0:
        raise TokensegError(f"otpl.proxy_kernel must be odd and >= 1, got {o.proxy_kernel}")
    if o.ppc_weight < 0 or o.pcls_weight < 0:
        raise TokensegError(f"otpl.ppc_weight and otpl.pcls_weight must be >= 0, got {o.ppc_weight}, {o.pcls_weight}")
    if not 0 <= o.marginal_mix <= 1 or not 0 <= o.memory_momentum < 1:
        raise TokensegError("otpl.marginal_mix must be in [0, 1] and otpl.memory_momentum in [0, 1)")
    choice("marginal", o.marginal, ("cam", "uniform"))
    choice("cam_norm", o.cam_norm, ("max", "minmax"))
    choice("columns", o.columns, ("all", "present"))
    choice("ppc_features", o.ppc_features, ("detach", "train"))
    choice("ppc_reduce", o.ppc_reduce, ("sum", "mean"))
    choice("fusion", o.fusion, FUSIONS)
    choice("background", o.background, ("auto", "token", "pooled", "none"))
    choice("prototypes", o.prototypes, ("tokens", "pooled"))


def validate(cfg) -> None:
    o = cfg.otpl
    _check_common(o)
    base = base_method(cfg)
    bad = [k for k in cfg.maps.kinds if k not in OTPL_KINDS and k not in base.recipe.kinds]
    if bad:
        raise TokensegError(f"maps.kinds: {', '.join(bad)} not made by OTPL on {base.name} (kinds: "
                            f"{', '.join(OTPL_KINDS + tuple(base.recipe.kinds))})")
    if o.fuse_with not in base.recipe.kinds or o.fuse_with.endswith(AFFINITY):
        plain = [k for k in base.recipe.kinds if not k.endswith(AFFINITY)]
        raise TokensegError(f"otpl.fuse_with={o.fuse_with!r}: must be a map kind of {base.name} without the "
                            f"affinity refinement ({', '.join(plain)})")
    if base.section:
        getattr(cfg, base.section)  # written out with the config
    if base.validate is not None:
        base.validate(base_config(cfg, base.name))


RECIPE = OnBaseRecipe(kinds=OTPL_KINDS, default_kinds=("otpl_affinity",), combine=combine)


register(Method(
    name="otpl", summary="OT-assisted proxy learning on a class-token base (otpl.base; ICCV 2025)",
    build=build, recipe=RECIPE, loss=loss, forward=forward, class_scores=class_scores, section="otpl",
    section_config=OTPLConfig, views=views, extras=extras, param_groups=param_groups, validate=validate,
    # [I] the base decides whether its graph changes between steps (CTI's late losses); a static flag
    # cannot follow otpl.base, so DDP looks for unused parameters
    dynamic_graph=True))
