"""``tokenseg predict``: colour masks and overlays for any images.

With a segmentation checkpoint (``tokenseg segment train``) each image gets the network's prediction
(multi-scale/flip/CRF optional). With a classification checkpoint (``tokenseg train``) the classes are
predicted from the class-token scores (sigmoid > ``cls_threshold``), their seeds computed with the
map recipe of the checkpoint's config (``tokenseg.maps.compute_maps``), and the mask is
``argmax([bg_threshold, maps])``: the training-free path, no segmentation stage needed.

Outputs per input image ``<stem>``: ``<out>/<stem>.png`` (VOC palette, 0 = background, c+1 = class c)
and, unless disabled, ``<out>/<stem>_overlay.jpg`` (the image blended with the mask colours).

Working size: the network runs on the image resized (aspect ratio kept) so that its longer side is at
most ``max_side`` -- by default tied to the checkpoint's training size (:func:`default_max_side`) --
and its scores are upsampled to the full size band by band (bilinear, as ``F.interpolate``) for the
argmax, so memory grows with one band of the full image, not with classes x full image. A 4000x3000
photo at full resolution peaked at 16.2 GB RSS with an 80-class segmentation network, and never
finished with a classification checkpoint (attention over 187,500 tokens). The CRF, when asked for,
runs at the working size too.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.device import amp_dtype as autocast_dtype
from ..core.device import init_distributed, resolve_device
from ..data.guard import refuse_inside_dataset
from ..core.errors import TokensegError
from ..core.locks import job_lock
from ..core.masks import save_palette_png, voc_palette
from ..core.files import write_bytes_atomic, write_json_atomic
from ..core.progress import progress_bar
from ..core.viz import class_legend, with_legend
from .evaluate import infer_probs, is_segmentation_checkpoint, load_segmenter, read_segmentation_checkpoint

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
    """Blend mask colours over the image where the mask is not background (ignore drawn cream).
    Only foreground pixels are converted to float (a 12 MP photo made four float copies before)."""
    pal = voc_palette().astype(np.float32)
    pal[255] = (224, 224, 192)
    out = np.array(image, dtype=np.uint8, copy=True)
    fg = mask != 0
    blend = (1 - alpha) * image[fg].astype(np.float32) + alpha * pal[mask[fg]]
    out[fg] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------
# working size: run small, decide at full size
# ----------------------------------------------------------------------------------------------

def default_max_side(cfg, kind: str) -> int:
    """[I] The longest side the network sees by default, from the checkpoint's training size:
    segmentation, 2 x ``segment.crop_size`` (crops are taken from images about twice their size: VOC
    321-px crops of ~500-px photos; the demo's 64-px crops of 96-px images); classification,
    ``model.img_size`` (its RandomResizedCrop size, which the map scales are relative to)."""
    if kind == "segmentation":
        return int(2 * cfg.segment.crop_size)
    return int(cfg.model.img_size)


def working_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the aspect ratio kept and max(h, w) <= ``max_side`` (0: the full size)."""
    if max_side <= 0 or max(height, width) <= max_side:
        return height, width
    s = max_side / max(height, width)
    return max(1, int(round(height * s))), max(1, int(round(width * s)))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    # PIL's bicubic widens its kernel when shrinking: antialiased, as tokenseg maps resize on the device
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def _bilinear_taps(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis:
    source = (i + 0.5) * n_in / n_out - 0.5, clamped at 0, two taps."""
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    w1 = src - i0.float()
    return i0, i1, 1 - w1, w1


def upsample_argmax(scores: torch.Tensor, height: int, width: int, values: np.ndarray | None = None,
                    band_bytes: int = 32 << 20) -> np.ndarray:
    """argmax over L of the bilinear upsampling of (L, h, w) ``scores`` to (height, width), as uint8
    (``values[argmax]`` when given). Equals ``F.interpolate(scores[None], (H, W), mode="bilinear")
    .argmax(1)`` up to float rounding, without its (L, H, W) buffer: bands of output rows, each made
    from the few source rows it needs, in two buffers allocated once, with the classes last in memory
    so the max reads contiguous values (measured 3x faster than F.interpolate + argmax for 81 classes
    at 3 MP on one thread, and ~64 MB instead of 1 GB)."""
    scores = scores.float().cpu()
    L, h, w = scores.shape
    lut = torch.as_tensor(values if values is not None else np.arange(L), dtype=torch.uint8)
    if (h, w) == (height, width):
        return lut[scores.argmax(0)].numpy()
    r0, r1, _, rw1 = _bilinear_taps(height, h)
    c0, c1, _, cw1 = _bilinear_taps(width, w)
    hwl = scores.permute(1, 2, 0).contiguous()  # (h, w, L): small, the working size
    cw1 = cw1[:, None]
    band = max(1, min(height, band_bytes // max(1, 4 * L * width)))
    y0, y1 = torch.empty(band, width, L), torch.empty(band, width, L)
    out = torch.empty(height, width, dtype=torch.uint8)
    threads = torch.get_num_threads()
    # [I] one intra-op thread: these ops are memory-bound and short, and OpenMP's barriers make them 3-10x
    # slower with 2 threads on a busy machine (measured, 81 classes at 3 MP: 0.9-1.4 s on 1 thread,
    # 3.5-10.9 s on 2 at load 5.7 on 2 cores)
    torch.set_num_threads(1)
    try:
        for a in range(0, height, band):  # bands of rows: tens per photo, not a loop over pixels or classes
            b = min(height, a + band)
            n, lo, hi = b - a, int(r0[a]), int(r1[b - 1]) + 1
            src = hwl[lo:hi]
            cols = torch.lerp(src.index_select(1, c0), src.index_select(1, c1), cw1)  # (hi - lo, W, L)
            torch.index_select(cols, 0, r0[a:b] - lo, out=y0[:n])
            torch.index_select(cols, 0, r1[a:b] - lo, out=y1[:n])
            y0[:n].lerp_(y1[:n], rw1[a:b, None, None])
            out[a:b] = lut[y0[:n].max(-1).indices]
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


def _save_overlay(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    write_bytes_atomic(path, buf.getvalue())


class _ClassifierPredictor:
    """Masks from a classification checkpoint of any method: its class scores pick the classes, its map
    recipe (``tokenseg.maps.compute_map_batch``) gives their maps, and its background model the rest."""

    def __init__(self, checkpoint: Path, device: torch.device, bg_threshold: float | None, cls_threshold: float,
                 scales: Sequence[float] | None, flip: bool | None, kind: str | None = None) -> None:
        from ..checkpoint import load_model_from_checkpoint
        from ..maps import compute_map_batch, normalise
        from ..methods import get_method

        loaded = load_model_from_checkpoint(checkpoint)
        self.model, self.cfg = loaded[0].to(device).eval(), loaded[1]
        self.names = list(loaded[2]) if len(loaded) > 2 else []
        self.method = get_method(self.cfg.model.method)
        self.device = device
        self.compute_map_batch, self.normalise = compute_map_batch, normalise
        mc = self.cfg.maps
        if scales is not None:
            mc.scales = list(scales)
        if flip is not None:
            mc.flip = flip
        recipe = self.method.recipe
        if kind:
            if kind not in recipe.kinds:
                raise TokensegError(f"--kind {kind!r}: {self.method.name} makes {list(recipe.kinds)}")
            self.kind = kind
        else:  # the kind its pseudo masks use, else its first map kind, else the method's default seeds
            kinds = [k for k in [self.cfg.pseudo.kind, *mc.kinds] if k in recipe.kinds] or list(recipe.default_kinds)
            self.kind = kinds[0]
        if getattr(self.model, "head", True) is None and self.kind not in ("attention", "attention_affinity"):
            self.kind = "attention_affinity"  # MCTformer-V1: no PatchCAM head
        # the background: --threshold if given, else the recipe's own channel (CTI, POT), else the pseudo-mask
        # settings of the config (a constant or CLIP-ES's power)
        if bg_threshold is not None:
            self.background = "constant"
        elif recipe.background == "channel":
            self.background = "channel"
        else:
            self.background = "power" if self.cfg.pseudo.background == "power" else "constant"
        self.bg = self.cfg.pseudo.threshold if bg_threshold is None else bg_threshold
        self.alpha = self.cfg.pseudo.alpha
        self.cls_threshold = cls_threshold

    def class_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid of the method's image-level scores (its ``class_scores``; ``cls_logits`` otherwise)."""
        logits = self.method.class_scores(self.model, x) if self.method.class_scores else self.model(x)["cls_logits"]
        return torch.sigmoid(logits.float())

    @torch.no_grad()
    def scores(self, image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(1 + K, h, w) scores [background, maps of the K predicted classes] for an image at its working
        size, and their mask values [0, c + 1, ...]."""
        from ..maps import scaled_size

        H, W = image.shape[:2]
        recipe = self.method.recipe
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(self.device)
        x = self.normalise(x, recipe.mean, recipe.std)
        p = recipe.size_multiple or getattr(self.model, "patch_size", 16)
        hs, ws = scaled_size(H, W, 1.0, p, "round")
        xin = x if (hs, ws) == (H, W) else torch.nn.functional.interpolate(x, size=(hs, ws), mode="bicubic",
                                                                           align_corners=False)
        labels = (self.class_probabilities(xin) > self.cls_threshold).float()
        if labels.sum() == 0:
            return torch.zeros(1, H, W), np.zeros(1, np.uint8)
        from ..core.seeds import SeedMaps
        from ..core.scores import seed_scores

        mb = self.compute_map_batch(self.model, x, labels, self.cfg, [self.kind])
        bg = mb.background[self.kind][0].float().cpu().numpy() if self.background == "channel" else None
        seed = SeedMaps(classes=mb.pairs[:, 1].cpu().numpy(), maps=mb.maps[self.kind].float().cpu().numpy(),
                        background=bg)  # the present classes in ascending order, (K, H, W)
        scores, values = seed_scores(seed, (H, W), self.background, float(self.bg), self.alpha)
        return torch.from_numpy(scores), values.astype(np.uint8)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        scores, values = self.scores(image)
        return values[scores.argmax(0).numpy()]


def predict(images: Iterable[str | Path], checkpoint: str | Path, out_dir: str | Path,
            scales: Sequence[float] | None = None, flip: bool | None = None, crf: bool = False,
            overlay: bool = True, overlay_format: str = "jpg", alpha: float = 0.5, device: str = "auto",
            bg_threshold: float | None = None, cls_threshold: float = 0.5, skip_existing: bool = False,
            progress: bool = True, max_side: int | None = None, kind: str | None = None,
            legend: bool = True) -> list[dict]:
    """Write one mask (and overlay) per input image; returns ``[{"image", "mask", "overlay", "classes"}]``.

    ``scales``/``flip`` default to single-scale, no flip (segmentation) or the checkpoint's map recipe
    (classification); ``crf`` uses the segmentation CRF preset (pydensecrf if installed, else torch).
    ``max_side``: the longest side the network sees (None: :func:`default_max_side` of the checkpoint;
    0: the full resolution); masks are always written at the image's full size. ``kind``: a classification
    checkpoint's seed kind (default: ``pseudo.kind``, else its first ``maps.kinds``, else the method's
    default). ``legend``: a band under each overlay naming the colour of every class it shows. The output
    folder is locked while writing and must not be a folder of the input images."""
    files = expand_inputs(images)
    out = Path(out_dir)
    folders = {Path(f).parent.resolve() for f in files}
    if out.resolve() in folders:  # masks are named after the images: <stem>.png could replace an input
        raise TokensegError(f"predict --out {out} is a folder of the input images: choose another folder "
                            f"(e.g. {out / 'predictions'})")
    state = read_segmentation_checkpoint(checkpoint)
    refuse_inside_dataset(out, trained_on(state), "predict --out")  # e.g. its ground-truth mask folder
    with job_lock(out, "tokenseg predict"):
        return _predict(files, checkpoint, state, out, scales, flip, crf, overlay, overlay_format, alpha, device,
                        bg_threshold, cls_threshold, skip_existing, progress, max_side, kind, legend)


def trained_on(state: dict):
    """The data section of the config a checkpoint records (its dataset's folders are never written), or
    None for weights without one (the authors')."""
    from ..config import Config, _merge

    conf = state.get("config")
    if not isinstance(conf, dict) or not isinstance(conf.get("data"), dict):
        return None
    cfg = Config()
    try:
        _merge(cfg.data, conf["data"], "data")
    except TokensegError:
        return None
    return cfg


def _predict(files, checkpoint, state, out: Path, scales, flip, crf, overlay, overlay_format, alpha, device,
             bg_threshold, cls_threshold, skip_existing, progress, max_side, kind, legend=True) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    dinfo = init_distributed(resolve_device(device).type)  # under torchrun each rank predicts its share
    dev = resolve_device(device, dinfo.local_rank)
    progress = progress and dinfo.is_main
    if max_side is not None and max_side < 0:
        raise TokensegError(f"--max-side must be >= 0 (0: full resolution), got {max_side}")
    if is_segmentation_checkpoint(state):
        del state
        model, cfg, names = load_segmenter(checkpoint, dev)
        amp = autocast_dtype(cfg.segment.amp, dev)
        sc = list(scales) if scales is not None else [1.0]
        fl = bool(flip) if flip is not None else False
        side = default_max_side(cfg, "segmentation") if max_side is None else int(max_side)

        def run(img: np.ndarray) -> np.ndarray:
            H, W = img.shape[:2]
            small = _resize(img, working_size(H, W, side))
            probs = infer_probs(model, small, sc, fl, cfg.segment.eval_merge, dev, amp)
            if crf:
                from ..core.crf import CRF_PRESETS, dense_crf

                probs = torch.from_numpy(dense_crf(small, probs.numpy(), CRF_PRESETS[cfg.segment.crf_preset], "auto"))
            return upsample_argmax(probs, H, W)
        source = "segmentation"
    else:
        del state
        runner = _ClassifierPredictor(Path(checkpoint), dev, bg_threshold, cls_threshold, scales, flip, kind)
        names = runner.names
        side = default_max_side(runner.cfg, "classification") if max_side is None else int(max_side)

        def run(img: np.ndarray) -> np.ndarray:
            H, W = img.shape[:2]
            small = _resize(img, working_size(H, W, side))
            scores, values = runner.scores(small)
            if crf:
                from ..core.crf import CRF_PRESETS, dense_crf

                idx = scores.argmax(0).numpy()
                present = np.unique(idx)
                onehot = np.stack([(idx == c) for c in present]).astype(np.float32) * 0.8 + 0.1
                scores = torch.from_numpy(dense_crf(small, onehot, CRF_PRESETS["mctformer-seg"]))
                values = values[present]
            return upsample_argmax(scores, H, W, values)
        source = "classification"
    from ..data import load_rgb

    results = []
    ext = "jpg" if overlay_format.lower() in ("jpg", "jpeg") else "png"
    todo = list(zip(files, output_stems(files)))[dinfo.rank::dinfo.world]
    told = False
    bar = progress_bar(total=len(todo), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    for f, stem in todo:
        mask_path = out / f"{stem}.png"
        ov_path = out / f"{stem}_overlay.{ext}"
        if skip_existing and mask_path.is_file() and (not overlay or ov_path.is_file()):
            results.append({"image": str(f), "mask": str(mask_path), "overlay": str(ov_path) if overlay else None,
                            "skipped": True})
            bar.update(1)
            continue
        img = np.asarray(load_rgb(f), dtype=np.uint8)
        H, W = img.shape[:2]
        if progress and not told and working_size(H, W, side) != (H, W):
            told = True
            bar.write(f"predict: images are processed at {side} px on their longer side (--max-side; 0 = full "
                      f"resolution) and their masks written at full size, e.g. {f.name} {W}x{H}")
        bar.set_postfix(image=f.name)
        mask = run(img)
        save_palette_png(mask_path, mask)
        present = [int(c) for c in np.unique(mask) if 0 < c < 255]
        if overlay:
            ov = overlay_image(img, mask, alpha)
            _save_overlay(ov_path, with_legend(ov, class_legend([0, *present], names)) if legend else ov)
        results.append({"image": str(f), "mask": str(mask_path), "overlay": str(ov_path) if overlay else None,
                        "classes": [names[c - 1] if c - 1 < len(names) else str(c) for c in present]})
        bar.update(1)
    bar.close()
    if dinfo.world > 1:  # every rank's share, back in the order of the inputs
        import torch.distributed as dist

        shares: list = [None] * dinfo.world
        dist.all_gather_object(shares, results)
        order = {str(f): i for i, f in enumerate(files)}
        results = sorted((r for share in shares for r in share), key=lambda r: order[r["image"]])
    if dinfo.is_main:
        write_json_atomic(out / "predictions.json", {"checkpoint": str(checkpoint), "source": source,
                                                     "max_side": side, "images": results})
    return results
