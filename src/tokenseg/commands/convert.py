"""``tokenseg convert``: the authors' MCTformer and CTI checkpoints and seed files to ours, and back."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  # the authors' MCTformer+ weights -> a tokenseg checkpoint (layout, method, size detected)
  tokenseg convert MCTformer_plus_voc.pth runs/mct-plus/checkpoint.pt --class-names voc
  # MCTformer-V2 (one pos_embed, DINO +0.1 interpolation at inference)
  tokenseg convert MCTformerV2_checkpoint.pth v2.pt --method mctformer-v2
  # the authors' CTI weights (a bare state dict: bg_token, tokenizer, C+1 tokens) -> ours, and back
  tokenseg convert 69.5_pascal.pth runs/cti/checkpoint.pt
  tokenseg convert runs/cti/checkpoint.pt cti_authors.pth --to authors      # their infer_trm.py loads it
  # ImageNet DeiT-S as initialisation: class token repeated C times, untrained heads
  tokenseg convert deit_small_patch16_224-cd65a155.pth init.pt --method mctformer-plus --num-classes 20
  # ours -> the authors' layout ({'model': state_dict}); their code loads it
  tokenseg convert runs/mct-plus/checkpoint.pt authors.pth --to authors
  # ours -> safetensors (weights + config + class names, no pickle); loads by path like a checkpoint
  tokenseg convert runs/mct-plus/checkpoint.pt plus.safetensors --to safetensors
  # seeds: our .npz folder -> their .npy dicts (for their evaluation.py), or back
  tokenseg convert runs/mct-plus/seeds/train/fused_affinity npy_seeds/
  tokenseg convert their_npy_seeds/ npz_seeds/

Authors' checkpoints also load directly: tokenseg maps CONFIG --checkpoint their.pth maps.mode=authors"""


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert the authors' MCTformer / CTI checkpoints / .npy seeds to ours and back",
        description="Convert between the authors' MCTformer-V1/V2/+ and CTI checkpoints (or an ImageNet DeiT/DINO "
                    "checkpoint as initialisation) and tokenseg checkpoints, in either direction; or between "
                    "folders of seed files (our .npz and their pickled .npy dicts).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint file, or a folder of seed files")
    p.add_argument("dst", help="output checkpoint file, or output folder for seeds")
    p.add_argument("--to", choices=["tokenseg", "authors", "safetensors"], default=None,
                   help="target layout (default: the other side of SRC); safetensors: our weights, config and "
                        "class names in a file that needs no unpickling (loads by path like a checkpoint)")
    p.add_argument("--method", default=None,
                   help="method of the authors' checkpoint: a method that converts its authors' files "
                        "(mctformer-v1, mctformer-v2, mctformer-plus, cti; default: detected from the keys; an "
                        "ImageNet checkpoint defaults to mctformer-plus); with --to authors the layout to write")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (checked against SRC)")
    p.add_argument("--class-names", default=None,
                   help="voc, coco, or a class names file (default: VOC for 20 classes, COCO for 80)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads, for non-DeiT sizes (default: DeiT-T/S/B 3/6/12, else dim/64)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="trust SRC: unpickle arbitrary objects (checkpoints with more than tensors and the "
                        "authors' args; .npy seeds beyond plain numpy arrays). Unpickling can run code")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from ..core.errors import TokensegError

    src = Path(args.src)
    if src.is_dir():
        from ..methods.mctformer.authors import export_seeds_npy, import_seeds_npy

        has_npz = any(src.rglob("*.npz"))
        to_npy = args.to != "tokenseg" if args.to else has_npz
        if to_npy:
            n = export_seeds_npy(src, args.dst)
            print(f"wrote {n} seed files as the authors' .npy dicts under {args.dst}")
        else:
            n = import_seeds_npy(src, args.dst, allow_pickle=args.allow_pickle)
            print(f"wrote {n} seed files as .npz under {args.dst}")
        return 0
    if not src.exists():
        raise TokensegError(f"{src}: not found")
    if args.to == "safetensors":
        from ..core.weights import export_safetensors

        n = export_safetensors(src, args.dst, allow_pickle=args.allow_pickle)
        print(f"{src} -> {args.dst} (safetensors, {n} tensors)")
        return 0
    res = convert_checkpoint(src, args.dst, to=args.to, method=args.method, num_classes=args.num_classes,
                             class_names=args.class_names, num_heads=args.num_heads, allow_pickle=args.allow_pickle)
    extra = "".join(f", {k} {res[k]}" for k in ("backbone", "img_size") if k in res)
    print(f"{src} ({res['from']}) -> {res['output']} ({res['to']}, {res['classes']} classes{extra})")
    return 0


# ---------------------------------------------------------------------------------------- checkpoints
def converters() -> dict[str, object]:
    """Each method that converts its authors' checkpoints -> its :class:`~tokenseg.methods.Converter`."""
    from ..methods import available_methods, get_method

    return {name: get_method(name).convert for name in available_methods() if get_method(name).convert}


def converter_of(method: str, converting: dict):
    from ..core.errors import TokensegError

    if method not in converting:
        raise TokensegError(f"--method {method}: not a method whose authors' checkpoints convert; use one of "
                            f"{', '.join(converting)}")
    return converting[method]


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str | None = None, method: str | None = None,
                       num_classes: int | None = None, class_names: str | list[str] | None = None,
                       num_heads: int | None = None, allow_pickle: bool = False) -> dict:
    """Authors' (or ImageNet) weights -> a tokenseg checkpoint, or a tokenseg checkpoint -> the authors'
    layout. ``to``: ``tokenseg`` | ``authors`` (default: the other side of what ``src`` is). Every method
    with a :class:`~tokenseg.methods.Converter` is asked whether the file is one of its layouts; returns a
    summary."""
    from ..checkpoint import config_from_checkpoint, save_checkpoint
    from ..core.errors import TokensegError
    from ..core.weights import is_tokenseg_checkpoint, read_weights, unwrap_state_dict
    from ..methods import IMAGENET

    src, dst = Path(src), Path(dst)
    obj = read_weights(src, allow_pickle)
    ours = is_tokenseg_checkpoint(obj)
    to = to or ("authors" if ours else "tokenseg")
    if to not in ("tokenseg", "authors"):
        raise TokensegError(f"--to must be tokenseg or authors, got {to!r}")
    converting = converters()
    if ours:
        if to == "tokenseg":
            raise TokensegError(f"{src}: is already a tokenseg checkpoint")
        return _export(src, dst, obj, config_from_checkpoint(obj), method, num_classes, converting)
    sd = unwrap_state_dict(obj, str(src), strip=("module.", "backbone."))
    claims = {}  # converter -> the layout it sees (one converter may serve several methods)
    for conv in converting.values():
        if conv not in claims and (layout := conv.claims(sd)):
            claims[conv] = layout
    own = {c: layout for c, layout in claims.items() if layout != IMAGENET}
    if to == "authors":
        if own:
            raise TokensegError(f"{src}: is already in the authors' layout ({next(iter(own.values()))})")
        raise TokensegError(f"{src}: not a checkpoint of ours nor of the authors' code")
    if method:
        conv = converter_of(method, converting)
        other = [(c, layout) for c, layout in own.items() if c is not conv]
        if other and conv not in own:
            c, layout = other[0]
            raise TokensegError(f"{src}: is a {c.title} checkpoint ({layout}), not {method} (whose files have "
                                f"{conv.marks}); use --method {layout}")
    elif claims:
        conv = next(iter(own or claims))
    else:
        raise TokensegError(f"{src}: not a layout of the authors' code that a method converts (methods: "
                            f"{', '.join(converting)}; first keys: {', '.join(list(sd)[:5])})")
    model, cfg, names = conv.load(obj, str(src), method, num_classes, class_names, num_heads, src)
    save_checkpoint(dst, model, None, None, 0, cfg, names, model.class_names_source)
    return {"from": claims.get(conv, IMAGENET), "to": f"tokenseg {cfg.model.method}", "classes": len(names),
            "backbone": cfg.model.backbone, "img_size": cfg.model.img_size, "output": str(dst)}


def _export(src: Path, dst: Path, obj: dict, cfg, method: str | None, num_classes: int | None,
            converting: dict) -> dict:
    """Our checkpoint -> the authors' file of ``method`` (default: the checkpoint's own)."""
    import io

    import torch

    from ..core.errors import TokensegError
    from ..core.files import write_bytes_atomic

    names = list(obj.get("class_names") or [])
    method = method or cfg.model.method
    if num_classes is not None and num_classes != len(names):
        raise TokensegError(f"{src}: has {len(names)} classes, not {num_classes}")
    if cfg.model.stem != "patch":
        raise TokensegError(f"{src}: model.stem={cfg.model.stem}: the authors' layout has only the linear "
                            "patch embedding")
    conv = converter_of(method, converting)
    if converting.get(cfg.model.method) is not conv:
        raise TokensegError(f"{src}: a {cfg.model.method} checkpoint cannot be written in the {method} layout")
    sd = conv.export(obj["model"], method)
    buf = io.BytesIO()
    torch.save({"model": sd} if conv.wrap else sd, buf)
    write_bytes_atomic(dst, buf.getvalue())
    return {"from": "tokenseg", "to": f"authors {method}", "classes": len(names), "keys": len(sd),
            "output": str(dst)}

