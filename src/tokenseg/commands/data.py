"""``tokenseg data``: check a dataset before training, write or import image-level label files, import
the label formats of labelling tools (YOLO, COCO, LabelMe) into the folder layout."""
from __future__ import annotations

import argparse
import textwrap

from ..data.guard import refuse_inside_dataset
from ..core.errors import TokensegError
from ..core.files import write_json_atomic


def register(sub) -> None:
    p = sub.add_parser("data", help="check a dataset; import YOLO/COCO/LabelMe labels; write label files",
                       description="Dataset tools: `data check` reports on a dataset, `data import` converts "
                                   "YOLO / COCO / LabelMe labels into the folder layout (data.format=folder), "
                                   "`data labels` writes an image-level labels file (from XML/masks/annotations "
                                   "or the authors' cls_labels.npy).")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True

    c = dsub.add_parser(
        "check", help="report counts, class balance, missing/corrupt files, mask values, image sizes",
        description="Read every split the config uses (train, val, maps/eval split) and report images per "
                    "class, missing or unreadable images, labels without images and images without labels, "
                    "mask values above the class count, image sizes. Exit status 1 when there are errors.",
        epilog="example: tokenseg data check my.yaml data.root=/data/VOCdevkit/VOC2012 --json check.json")
    c.add_argument("config", help="preset name or YAML file")
    c.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    c.add_argument("--split", action="append", default=None,
                   help="split to check (repeatable; default: every split the config uses)")
    c.add_argument("--json", metavar="FILE", help="also write the full report as JSON (atomically)")
    c.add_argument("--skip-bad", action="store_true",
                   help="treat missing/unreadable images as warnings (a run with data.skip_bad=true skips them)")
    c.add_argument("--fast", action="store_true", help="read image headers only (does not find truncated files)")
    c.add_argument("--workers", type=int, default=0, help="threads for reading files (default: data.num_workers)")
    c.add_argument("--quiet", action="store_true", help="print only the result line")
    c.set_defaults(func=cmd_check)

    lab = dsub.add_parser(
        "labels", help="write an image-level labels JSON (from XML, masks, annotations, or cls_labels.npy)",
        description="Write the image-level labels of a dataset to our plain JSON format, from the source "
                    "you choose; or convert the authors' pickled cls_labels.npy to that format.",
        epilog="examples:\n"
               "  tokenseg data labels my.yaml data.root=VOC2012 --source xml -o voc_labels.json\n"
               "  tokenseg data labels --import-npy cls_labels.npy --allow-pickle -o voc_labels.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lab.add_argument("config", nargs="?", help="preset name or YAML file (not needed with --import-npy)")
    lab.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    lab.add_argument("-o", "--output", required=True, help="labels JSON to write")
    lab.add_argument("--split", action="append", default=None,
                     help="split to include (repeatable; default: every split the config uses)")
    lab.add_argument("--source", default="auto", choices=["auto", "file", "xml", "masks", "annotations"],
                     help="where the labels come from (sets data.label_source; default auto)")
    lab.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read")
    lab.add_argument("--import-npy", metavar="NPY", help="convert the authors' cls_labels.npy instead")
    lab.add_argument("--allow-pickle", action="store_true",
                     help="needed with --import-npy: the .npy is a pickle, and unpickling can run code")
    lab.add_argument("--classes", default="",
                     help="with --import-npy: voc, coco, or a class names file (default: by vector length)")
    lab.set_defaults(func=cmd_labels)

    from ..data.coco import RASTERIZERS
    from ..data.importers import IMPORT_FORMATS, LINK_MODES

    imp = dsub.add_parser(
        "import", help="convert YOLO / COCO / LabelMe labels into the folder layout (images, masks, labels.csv)",
        description=textwrap.fill(
                    "Read the labels a labelling tool wrote and write the folder layout that data.format=folder "
                    "reads: DST/images (hard links by default), DST/masks/<id>.png (polygons and masks "
                    "rasterised: 0 background, c+1 class c, 255 ignore), DST/labels.csv (image-level labels and "
                    "the split when the source has one) and DST/classes.txt. YOLO boxes give image-level labels "
                    "only. Nothing is written into SRC; every file is written atomically and the command resumes "
                    "an interrupted import of the same source. A non-empty DST that is not such an import is "
                    "refused without --overwrite (which leaves files it does not write in place).", 100),
        epilog="examples:\n"
               "  tokenseg data import --from yolo my_yolo_seg/ --out my_data\n"
               "  tokenseg data import --from coco annotations/instances_default.json --images imgs/ --out my_data\n"
               "  tokenseg data import --from labelme labelme_jsons/ --out my_data --classes classes.txt\n"
               "then: tokenseg data check photos-scratch data.root=my_data data.train_split=train "
               "data.val_split=val",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("--from", dest="source_format", required=True, choices=IMPORT_FORMATS,
                     help="the source format")
    imp.add_argument("source", metavar="SRC",
                     help="yolo: the dataset folder (images/ + labels/, or <split>/images + <split>/labels); "
                          "coco: an instances JSON or a folder of them; labelme: a folder of LabelMe JSON files")
    imp.add_argument("--out", "-o", required=True, metavar="DST", help="the folder dataset to write")
    imp.add_argument("--classes", metavar="FILE",
                     help="class order, one name per line (yolo: class 0 first; default data.yaml 'names', "
                          "classes.txt or obj.names; coco: default the categories by id; labelme: default the "
                          "sorted labels)")
    imp.add_argument("--link", choices=LINK_MODES, default="hard",
                     help="how images get into DST/images: hard links (default; a copy across file systems), "
                          "copies, or symlinks")
    imp.add_argument("--overwrite", action="store_true", help="write into a non-empty DST anyway")
    imp.add_argument("--split", default="", help="coco: the split name of a single JSON file (default: none)")
    imp.add_argument("--images", metavar="DIR", help="coco: the image folder (default: found next to the JSON)")
    imp.add_argument("--keep-empty", action="store_true",
                     help="coco: keep images without annotations (as background only)")
    imp.add_argument("--rasterizer", choices=RASTERIZERS, default="auto",
                     help="polygon rasteriser (auto: pycocotools when installed)")
    imp.add_argument("--workers", type=int, default=2, help="threads (default 2)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=cmd_import)


def _config(args):
    from ..config import load_config

    return load_config(args.config, args.overrides)


def cmd_check(args) -> int:
    from ..data.check import check_dataset, format_report

    cfg = _config(args)
    if args.skip_bad:
        cfg.data.skip_bad = True
    if args.json:
        refuse_inside_dataset(args.json, cfg, "data check --json")
    report = check_dataset(cfg, args.split, decode=not args.fast, workers=args.workers or None,
                           progress=not args.quiet)
    text = format_report(report)
    print(text.splitlines()[-1] if args.quiet else text)
    if args.json:
        write_json_atomic(args.json, report)
        if not args.quiet:
            print(f"report written to {args.json}")
    return 0 if report["ok"] else 1


def cmd_labels(args) -> int:
    from ..data.labels import read_class_names
    from ..data.label_files import import_cls_labels_npy, write_labels_file

    if args.import_npy:
        names = None
        if args.classes == "voc":
            from ..data.voc import VOC_CLASSES as names
        elif args.classes == "coco":
            from ..data.coco import COCO_CLASSES as names
        elif args.classes:
            names = read_class_names(args.classes)
        elif args.config:
            from ..data import class_names_for

            names = class_names_for(_config(args).data)
        if args.config:
            refuse_inside_dataset(args.output, _config(args), "data labels -o")
        classes, labels, source = import_cls_labels_npy(args.import_npy, names, allow_pickle=args.allow_pickle)
        write_labels_file(args.output, labels, classes, source)
        print(f"wrote {len(labels)} images x {len(classes)} classes to {args.output} (source: {source})")
        return 0
    if not args.config:
        raise TokensegError("data labels: give a CONFIG (or --import-npy FILE)")
    from ..data import build_dataset
    from ..data.check import default_splits

    cfg = _config(args)
    refuse_inside_dataset(args.output, cfg, "data labels -o")
    source = args.source
    if source == "annotations":
        if cfg.data.format != "coco":
            raise TokensegError("--source annotations is for COCO (data.format=coco); VOC uses xml")
        source = "auto"
        cfg.data.labels_file = ""  # from the instance annotations, not a labels file
    if source == "xml" and cfg.data.format != "voc":
        raise TokensegError(f"--source xml needs data.format=voc (got {cfg.data.format!r})")
    cfg.data.label_source = source
    if args.skip_bad:
        cfg.data.skip_bad = True
    splits = args.split or default_splits(cfg)
    datasets = [build_dataset(cfg.data, s) for s in splits]
    merged: dict[str, list[int]] = {}
    for ds in datasets:
        for image_id, lab in zip(ds.ids, ds.labels):
            if image_id in merged and sorted(merged[image_id]) != sorted(lab):
                raise TokensegError(f"image {image_id!r} has different labels in two splits")
            merged[image_id] = lab
    src = " + ".join(dict.fromkeys(ds.label_source for ds in datasets))
    write_labels_file(args.output, merged, datasets[0].class_names, src,
                      splits={s: ds.ids for s, ds in zip(splits, datasets)})
    per = ", ".join(f"{s} {len(ds)}" for s, ds in zip(splits, datasets))
    print(f"wrote labels of {len(merged)} images ({per}; source: {src}) to {args.output}")
    return 0



def cmd_import(args) -> int:
    from ..data.importers import format_summary, import_dataset

    summary = import_dataset(args.source_format, args.source, args.out, classes=args.classes, link=args.link,
                             overwrite=args.overwrite, split=args.split, images=args.images,
                             keep_empty=args.keep_empty, rasterizer=args.rasterizer, workers=args.workers,
                             progress=not args.quiet)
    print(format_summary(summary))
    return 1 if summary["problems"] else 0
