"""``tokenseg data``: check a dataset before training, write or import image-level label files."""
from __future__ import annotations

import argparse

from ..io import TokensegError, write_json_atomic


def register(sub) -> None:
    p = sub.add_parser("data", help="check a dataset; write/import image-level label files",
                       description="Dataset tools: `data check` reports on a dataset, `data labels` writes "
                                   "an image-level labels file (from XML/masks/annotations or the authors' "
                                   "cls_labels.npy).")
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


def _config(args):
    from ..config import load_config

    return load_config(args.config, args.overrides)


def cmd_check(args) -> int:
    from ..data.check import check_dataset, format_report

    cfg = _config(args)
    if args.skip_bad:
        cfg.data.skip_bad = True
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
    from ..data.labels import import_cls_labels_npy, read_class_names, write_labels_file

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
        classes, labels, source = import_cls_labels_npy(args.import_npy, names, allow_pickle=args.allow_pickle)
        write_labels_file(args.output, labels, classes, source)
        print(f"wrote {len(labels)} images x {len(classes)} classes to {args.output} (source: {source})")
        return 0
    if not args.config:
        raise TokensegError("data labels: give a CONFIG (or --import-npy FILE)")
    from ..data import build_dataset
    from ..data.check import default_splits

    cfg = _config(args)
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

