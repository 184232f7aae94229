"""``tokenseg predict``: colour masks and overlays for any images.

With a segmentation checkpoint (``tokenseg segment train``) each image gets the network's prediction
(multi-scale/flip/CRF optional). With a classification checkpoint (``tokenseg train``) the classes are
predicted from the class-token scores (sigmoid > ``cls_threshold``), their seeds computed with the
map recipe of the checkpoint's config (``tokenseg.maps.compute_maps``), and the mask is
``argmax([bg_threshold, maps])``: the training-free path, no segmentation stage needed.

Outputs per input image ``<stem>``: ``<out>/<stem>.png`` (VOC palette, 0 = background, c+1 = class c)
and, unless disabled, ``<out>/<stem>_overlay.jpg`` (the image blended with the mask colours).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..io import TokensegError, save_palette_png, voc_palette, write_bytes_atomic, write_json_atomic
from .evaluate import is_segmentation_checkpoint, load_segmenter, predict_mask, read_segmentation_checkpoint
from .train import autocast_dtype, resolve_device

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their images (sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not found:
                raise TokensegError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TokensegError(f"{p}: no such image file or folder")
    if not files:
        raise TokensegError("predict: no input images")
    return files


def output_stems(files: Sequence[Path]) -> list[str]:
    """One unique output name per input (``name``, ``name_1``, ... when stems repeat)."""
    seen: dict[str, int] = {}
    stems = []
    for f in files:
        stem = f.stem
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        stems.append(stem if k == 0 else f"{stem}_{k}")
    taken = set()
    out = []
    for s in stems:  # a renamed stem could collide with a real one: bump again
        t, k = s, 1
        while t in taken:
            t, k = f"{s}_{k}", k + 1
        taken.add(t)
        out.append(t)
    return out


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend mask colours over the image where the mask is not background (ignore drawn cream)."""
    pal = voc_palette().astype(np.float32)
    pal[255] = (224, 224, 192)
    colour = pal[mask]
    out = image.astype(np.float32)
    fg = (mask != 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colour, out)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _save_overlay(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    write_bytes_atomic(path, buf.getvalue())


class _ClassifierPredictor:
    """Masks from a classification checkpoint's maps (the lead's ``tokenseg.maps.compute_maps``)."""

    def __init__(self, checkpoint: Path, device: torch.device, bg_threshold: float | None, cls_threshold: float,
                 scales: Sequence[float] | None, flip: bool | None) -> None:
        try:
            from ..engine import load_model_from_checkpoint
            from ..maps import compute_maps, normalise
        except ImportError as exc:  # pragma: no cover - depends on the core being installed
            raise TokensegError(f"predicting from a classification checkpoint needs tokenseg.maps ({exc})") from exc
        loaded = load_model_from_checkpoint(checkpoint)
        self.model, self.cfg = loaded[0].to(device).eval(), loaded[1]
        self.names = list(loaded[2]) if len(loaded) > 2 else []
        self.device = device
        self.compute_maps, self.normalise = compute_maps, normalise
        mc = self.cfg.maps
        if scales is not None:
            mc.scales = list(scales)
        if flip is not None:
            mc.flip = flip
        self.kind = mc.kinds[0]
        if self.model.head is None and self.kind not in ("attention", "attention_affinity"):
            self.kind = "attention_affinity"
        self.bg = self.cfg.pseudo.threshold if bg_threshold is None else bg_threshold
        self.cls_threshold = cls_threshold

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        from ..maps import scaled_size

        H, W = image.shape[:2]
        x = self.normalise(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(self.device))
        p = self.model.patch_size
        hs, ws = scaled_size(H, W, 1.0, p, "round")
        xin = x if (hs, ws) == (H, W) else torch.nn.functional.interpolate(x, size=(hs, ws), mode="bicubic",
                                                                           align_corners=False)
        out = self.model(xin)
        score = torch.sigmoid(out["cls_logits"].float())
        labels = (score > self.cls_threshold).float()
        if labels.sum() == 0:
            return np.zeros((H, W), np.uint8)
        maps = self.compute_maps(self.model, x, labels, self.cfg.maps, [self.kind])[self.kind][0]
        present = torch.nonzero(labels[0]).flatten()
        m = maps[present].cpu().numpy()
        scores = np.concatenate([np.full((1, H, W), self.bg, np.float32), m], 0)
        lab = np.concatenate([[0], present.cpu().numpy() + 1])
        return lab[scores.argmax(0)].astype(np.uint8)


def predict(images: Iterable[str | Path], checkpoint: str | Path, out_dir: str | Path,
            scales: Sequence[float] | None = None, flip: bool | None = None, crf: bool = False,
            overlay: bool = True, overlay_format: str = "jpg", alpha: float = 0.5, device: str = "auto",
            bg_threshold: float | None = None, cls_threshold: float = 0.5, skip_existing: bool = False,
            progress: bool = True) -> list[dict]:
    """Write one mask (and overlay) per input image; returns ``[{"image", "mask", "overlay", "classes"}]``.

    ``scales``/``flip`` default to single-scale, no flip (segmentation) or the checkpoint's map recipe
    (classification); ``crf`` uses the segmentation CRF preset (pydensecrf if installed, else torch)."""
    files = expand_inputs(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    state = read_segmentation_checkpoint(checkpoint)
    if is_segmentation_checkpoint(state):
        del state
        model, cfg, names = load_segmenter(checkpoint, dev)
        amp = autocast_dtype(cfg.segment.amp, dev)
        sc = list(scales) if scales is not None else [1.0]
        fl = bool(flip) if flip is not None else False

        def run(img: np.ndarray) -> np.ndarray:
            return predict_mask(model, img, sc, fl, cfg.segment.eval_merge, crf, cfg.segment.crf_preset, "auto",
                                dev, amp)
        source = "segmentation"
    else:
        del state
        runner = _ClassifierPredictor(Path(checkpoint), dev, bg_threshold, cls_threshold, scales, flip)
        names = runner.names

        def run(img: np.ndarray) -> np.ndarray:
            mask = runner(img)
            if crf:
                from ..refine.crf import CRF_PRESETS, dense_crf

                present = np.unique(mask)
                onehot = np.stack([(mask == c) for c in present]).astype(np.float32) * 0.8 + 0.1
                mask = present[dense_crf(img, onehot, CRF_PRESETS["mctformer-seg"]).argmax(0)].astype(np.uint8)
            return mask
        source = "classification"
    from ..data import load_rgb

    results = []
    ext = "jpg" if overlay_format.lower() in ("jpg", "jpeg") else "png"
    for f, stem in tqdm(list(zip(files, output_stems(files))), desc="predict", unit="img", disable=not progress):
        mask_path = out / f"{stem}.png"
        ov_path = out / f"{stem}_overlay.{ext}"
        if skip_existing and mask_path.is_file() and (not overlay or ov_path.is_file()):
            results.append({"image": str(f), "mask": str(mask_path), "overlay": str(ov_path) if overlay else None,
                            "skipped": True})
            continue
        img = np.asarray(load_rgb(f), dtype=np.uint8)
        mask = run(img)
        save_palette_png(mask_path, mask)
        if overlay:
            _save_overlay(ov_path, overlay_image(img, mask, alpha))
        present = [int(c) for c in np.unique(mask) if 0 < c < 255]
        results.append({"image": str(f), "mask": str(mask_path), "overlay": str(ov_path) if overlay else None,
                        "classes": [names[c - 1] if c - 1 < len(names) else str(c) for c in present]})
    write_json_atomic(out / "predictions.json", {"checkpoint": str(checkpoint), "source": source,
                                                 "images": results})
    return results
