"""Post-processing subcommands: ``pseudo`` (seeds -> masks), ``segment train|evaluate``, ``predict``."""
from __future__ import annotations

import argparse

from .common import config_args as _config_args
from .common import guard_outputs
from .common import load as _load


def _scales(text: str | None):
    if text is None:
        return None
    from ..core.errors import TokensegError

    try:
        vals = [float(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise TokensegError(f"--scales must be numbers like 0.75,1,1.25; got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise TokensegError(f"--scales must be positive numbers, got {text!r}")
    return vals


def cmd_pseudo(args) -> int:
    from ..data import build_dataset
    from ..core.files import write_json_atomic
    from ..refine.pseudo import evaluate_masks, format_scores, make_pseudo_masks

    cfg = _load(args)
    if args.split:
        cfg.pseudo.split = args.split
    guard_outputs(cfg, "pseudo", json=args.json)
    summary = make_pseudo_masks(cfg, seeds_dir=args.seeds, out_dir=args.out, checkpoint=args.checkpoint,
                                work_dir=args.work, overwrite=args.overwrite, progress=not args.quiet)
    print(f"pseudo masks for split {summary['split']!r} from {summary['seeds_dir']}: {summary['out_dir']} "
          f"({summary['written']} written, {summary['skipped_existing']} already there, "
          f"{summary['missing_seeds']} without seeds)")
    if args.eval:
        split = args.eval_split or summary["split"]
        res = evaluate_masks(summary["out_dir"], build_dataset(cfg.data, split), progress=not args.quiet,
                             classes=cfg.eval.miou_classes)
        print(format_scores(f"masks [{split}]", res))
        if args.json:
            write_json_atomic(args.json, {"summary": summary, "eval": res})
    elif args.json:
        write_json_atomic(args.json, {"summary": summary})
    return 0


def cmd_segment_train(args) -> int:
    from ..refine.pseudo import format_scores
    from ..segment.train import train_segmentation

    cfg = _load(args)
    if args.no_eval:
        cfg.segment.eval_at_end = False
    if args.split:
        cfg.segment.train_split = args.split
    metrics = train_segmentation(cfg, masks_dir=args.masks, out_dir=args.out, resume=args.resume,
                                 progress=not args.quiet, overwrite=args.overwrite)
    print(f"checkpoint: {metrics['checkpoint']} ({metrics['steps']} steps on {metrics['train_images']} images)")
    if metrics.get("val"):
        print(format_scores(f"segmentation [{metrics['val']['split']}]", metrics["val"]))
    return 0


def cmd_segment_evaluate(args) -> int:
    from ..core.files import write_json_atomic
    from ..refine.pseudo import format_scores
    from ..segment.evaluate import evaluate_segmentation

    cfg = _load(args)
    guard_outputs(cfg, "segment evaluate", json=args.json, save_masks=args.save_masks)
    res = evaluate_segmentation(cfg, checkpoint=args.checkpoint, split=args.split, scales=_scales(args.scales),
                                flip=args.flip, crf=args.crf, save_dir=args.save_masks, progress=not args.quiet)
    title = (f"segmentation [{res['split']}] scales {res['scales']}{' + flip' if res['flip'] else ''}"
             f"{' + CRF' if res['crf'] else ''}")
    print(format_scores(title, res))
    if args.json:
        write_json_atomic(args.json, res)
    return 0


def cmd_predict(args) -> int:
    from ..segment.predict import predict

    results = predict(args.images, args.checkpoint, args.out, scales=_scales(args.scales), flip=args.flip,
                      crf=args.crf, overlay=not args.no_overlay, overlay_format=args.overlay_format,
                      alpha=args.alpha, device=args.device, bg_threshold=args.threshold,
                      cls_threshold=args.cls_threshold, skip_existing=args.skip_existing, progress=not args.quiet,
                      max_side=args.max_side, kind=args.kind, legend=not args.no_legend)
    print(f"{len(results)} masks written to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "pseudo", help="seeds -> pseudo masks (background model, CRF, random walk, confidence mask)",
        description="Turn seed maps into pseudo masks (VOC-palette PNGs, 255 = ignore). Background: a "
                    "constant score (pseudo.threshold) or (1-max)^alpha (pseudo.background=power). Refinement: "
                    "pseudo.refine=attention (the classifier's attention random walk), affinitynet (PSA) or irn "
                    "(IRN: MMCST/OTPL/POT). "
                    "pseudo.crf=true adds DenseCRF (pseudo.crf_preset psa|mctformer-seg|clip-es); "
                    "pseudo.confidence=0.95 ignores uncertain pixels (CLIP-ES). Existing masks are kept, so "
                    "an interrupted run resumes.",
        epilog="examples:\n"
               "  tokenseg pseudo mctformer-plus data.root=VOC2012 pseudo.threshold=0.45 --eval\n"
               "  tokenseg pseudo my.yaml pseudo.background=power pseudo.crf=true pseudo.crf_preset=clip-es "
               "pseudo.confidence=0.95\n"
               "  tokenseg pseudo my.yaml pseudo.refine=affinitynet --seeds runs/x/seeds/train_aug/fused_affinity\n"
               "  tokenseg pseudo my.yaml pseudo.refine=irn pseudo.irn.pretrained=true --eval",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(p)
    p.add_argument("--split", help="split whose seeds become masks (default pseudo.split, else maps.split)")
    p.add_argument("--seeds", metavar="DIR", help="seed folder (default <output_dir>/seeds/<split>/<kind>)")
    p.add_argument("--out", metavar="DIR", help="mask folder to write (default <output_dir>/pseudo)")
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="classification checkpoint for pseudo.refine=attention (default <output_dir>/checkpoint.pt)")
    p.add_argument("--work", metavar="DIR",
                   help="AffinityNet / IRN work folder (default <output_dir>/affinitynet or <output_dir>/irn)")
    p.add_argument("--overwrite", action="store_true", help="rewrite masks that already exist")
    p.add_argument("--eval", action="store_true", help="score the masks against the ground truth afterwards")
    p.add_argument("--eval-split", metavar="SPLIT", help="split to score (default: the masks' split)")
    p.add_argument("--json", metavar="FILE", help="write the summary (and scores) as JSON")
    p.set_defaults(func=cmd_pseudo)

    s = sub.add_parser("segment", help="train / evaluate a segmentation network on pseudo masks",
                       description="The segmentation stage: `segment train` trains DeepLab-V2 (timm ResNet, "
                                   "ASPP) or a ViT on pseudo masks; `segment evaluate` scores it with multi-scale, "
                                   "flip and optional CRF.")
    ssub = s.add_subparsers(dest="segment_command", metavar="ACTION")
    ssub.required = True
    t = ssub.add_parser(
        "train", help="train on pseudo masks (SGD, poly lr, 10x head lr, scale/flip/crop, ignore 255)",
        description="Train cfg.segment on the PNG masks in --masks for the images of segment.train_split "
                    "(default data.train_split) that have a mask. Writes <out>/checkpoint.pt atomically every "
                    "epoch; --resume continues from it.",
        epilog="examples:\n"
               "  tokenseg segment train mctformer-plus data.root=VOC2012 segment.pretrained=true \\\n"
               "      --masks runs/x/pseudo\n"
               "  tokenseg segment train my.yaml segment.backbone=resnet50 segment.weights=r50.pth --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(t)
    t.add_argument("--masks", metavar="DIR", help="pseudo masks (default segment.masks or <output_dir>/pseudo)")
    t.add_argument("--out", metavar="DIR", help="output folder (default <output_dir>/segment)")
    t.add_argument("--split", help="split to train on (default segment.train_split, else data.train_split)")
    t.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt (a run with the same settings does so anyway)")
    t.add_argument("--overwrite", action="store_true",
                   help="start over, replacing the checkpoint in --out (needed when the settings changed)")
    t.add_argument("--no-eval", action="store_true",
                   help="skip the validation at the end (segment.final_eval=none; default quick: one scale, no "
                        "flip; full: segment.eval_scales + flip, as segment evaluate)")
    t.set_defaults(func=cmd_segment_train)

    e = ssub.add_parser(
        "evaluate", help="val mIoU with multi-scale + flip (+ CRF); per-class IoU table",
        epilog="example: tokenseg segment evaluate my.yaml --checkpoint runs/x/segment/checkpoint.pt --crf")
    _config_args(e)
    e.add_argument("--checkpoint", metavar="CKPT", help="default <output_dir>/segment/checkpoint.pt")
    e.add_argument("--split", help="split to score (default segment.val_split or data.val_split)")
    e.add_argument("--scales", metavar="LIST", help="e.g. 0.5,0.75,1,1.25,1.5 (default segment.eval_scales)")
    e.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="add horizontal flips (default segment.eval_flip)")
    e.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="DenseCRF on the probabilities (default segment.eval_crf)")
    e.add_argument("--save-masks", metavar="DIR", help="also write the predicted masks there")
    e.add_argument("--json", metavar="FILE", help="write the scores as JSON")
    e.set_defaults(func=cmd_segment_evaluate)

    pr = sub.add_parser(
        "predict", help="colour masks + overlays for any images with a trained model",
        description="One VOC-palette mask <stem>.png and one overlay <stem>_overlay.jpg per input image, from a "
                    "segmentation checkpoint (segment train) or directly from a classification checkpoint "
                    "(train): classes predicted by the class tokens, masks from their maps.",
        epilog="examples:\n"
               "  tokenseg predict photo1.jpg photo2.png --checkpoint runs/x/segment/checkpoint.pt --out preds\n"
               "  tokenseg predict my_images/ --checkpoint runs/x/checkpoint.pt --out preds --threshold 0.45",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("images", nargs="+", help="image files or folders of images")
    pr.add_argument("--checkpoint", required=True, metavar="CKPT", help="segmentation or classification checkpoint")
    pr.add_argument("--out", required=True, metavar="DIR", help="output folder")
    pr.add_argument("--scales", metavar="LIST", help="inference scales, e.g. 0.75,1,1.25 (default 1)")
    pr.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="add horizontal flips")
    pr.add_argument("--crf", action="store_true", help="DenseCRF refinement")
    pr.add_argument("--no-overlay", action="store_true", help="masks only")
    pr.add_argument("--overlay-format", default="jpg", choices=["jpg", "png"],
                    help="overlay file type (png: lossless, sharp class edges and legend text)")
    pr.add_argument("--no-legend", action="store_true",
                    help="overlays without the band under the image that names each class colour")
    pr.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    pr.add_argument("--threshold", type=float, default=None,
                    help="classification checkpoint: background score (default pseudo.threshold of its config)")
    pr.add_argument("--kind", default=None,
                    help="classification checkpoint: the seed kind that makes the masks (default: pseudo.kind of "
                         "its config, else its first maps.kinds, else the method's default seeds)")
    pr.add_argument("--cls-threshold", type=float, default=0.5,
                    help="classification checkpoint: class present when sigmoid(score) > this (default 0.5)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pr.add_argument("--skip-existing", action="store_true", help="keep outputs that already exist")
    pr.add_argument("--max-side", type=int, default=None, metavar="PX",
                    help="longest side the network sees (default: 2 x segment.crop_size of a segmentation "
                         "checkpoint, model.img_size of a classifier; 0 = full resolution); masks are written "
                         "at full size")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_predict)
