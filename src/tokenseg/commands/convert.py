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
    p.add_argument("--method", choices=["mctformer-v1", "mctformer-v2", "mctformer-plus", "cti"], default=None,
                   help="method of the authors' checkpoint (default: detected from the keys; an ImageNet "
                        "checkpoint defaults to mctformer-plus); with --to authors the layout to write")
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
    from ..models.convert import convert_checkpoint

    res = convert_checkpoint(src, args.dst, to=args.to, method=args.method, num_classes=args.num_classes,
                             class_names=args.class_names, num_heads=args.num_heads, allow_pickle=args.allow_pickle)
    extra = "".join(f", {k} {res[k]}" for k in ("backbone", "img_size") if k in res)
    print(f"{src} ({res['from']}) -> {res['output']} ({res['to']}, {res['classes']} classes{extra})")
    return 0
