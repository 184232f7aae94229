"""Make ``tests/fixtures/authors-pot/``: what the released POT code (github.com/jianwang91/POT) computes
on a seeded random ResNet-50, for ``tests/test_pot_authors.py``.

Their code is never copied into this repository: it is imported from the folder given on the command
line (the ``POT/`` folder of a clone), when this script runs::

    git clone https://github.com/jianwang91/POT /tmp/POT-src    # or the fetch tool's mirror
    python tools/gen_pot_fixture.py --pot /tmp/POT-src/POT [--out tests/fixtures/authors-pot]

What runs of theirs, unchanged:
- ``network/resnet50_POT.py``: ``Net`` (training forward: ``get_seed_aff_x4``, their CLIP-ES fusion)
  and ``CAM`` (inference forward, the original + mirrored pair summed), on their ``network/resnet50.py``;
- ``data/data_voc.py``: ``VOC12ClsDatasetMSF`` (PIL bicubic rescale of each scale, normalise, mirror
  pair) and ``VOC12ClsDataset`` with ``resize`` (the VOC training input, no crop, no flip);
- the lines of ``make_cam.py``'s ``_work`` from ``outputs = [model(...)`` to ``IS_CAM1 = IS_CAM1[valid_cat]``
  (the scales' IS_CAM / IS_CAM1 seeds) and of ``train_resnet50_POT.py``'s step from ``img = pack['img']``
  to ``losses = 0.5 * lossCLS + lossCon`` (their CLIP-ES loading, the forward and the losses), read from
  their files and executed as they are;
- ``kmeans_pytorch.kmeans`` (the installed library, 0.3), which their ``get_seed_aff_x4`` calls.

Shims (only what a CPU machine without their old environment needs; nothing of their arithmetic):
- modules they import but do not use here, when missing: ``cv2`` (only ``__version__`` is read),
  ``pydensecrf`` (imported by ``tool/imutils.py``);
- ``torch.Tensor.cuda`` returns the tensor itself when no GPU is present (their code calls ``.cuda()``);
- ``torch.utils.model_zoo.load_url`` (ImageNet weights) returns a placeholder; every parameter and
  buffer is then overwritten with :func:`released_state` (seeded, no download);
- the two ``np.load`` calls of the executed lines read the CLIP-ES maps given here instead of their
  hard-coded paths; ``avg_meter`` (a log) is a no-op;
- ``np.random.seed`` before each forward: ``kmeans_pytorch`` draws its initial points from numpy's
  global RNG. Inference: ``np.random.seed(MAP_SEED)`` before each scale's forward (tokenseg:
  ``pot.seed``, a fresh ``RandomState`` per image and scale); training: the seed tokenseg derives for
  step 0, rank 0 (``SeedSequence([train.seed, 0, 0, 7])``);
- their k-means prints progress: stdout/stderr are silenced around their calls.

The ResNet-50 state (~100 MB) is not stored: ``released_state(shapes, seed)`` regenerates it from the
seed and the parameter shapes (``state_shapes.json``), here and in the test.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path

import numpy as np
import torch

STATE_SEED = 1234
MAP_SEED = 0  # pot.seed
TRAIN_SEED = 15  # train.seed (their default --seed)
SCALES = (1.0, 0.5, 1.5, 2.0)  # their make_cam.py
TRAIN_SIZE = 128  # their VOC12ClsDataset resize (512 in their script; small here)
NAMES = ["2007_000032", "2007_000039", "2007_000063"]
SIZES = [(100, 130), (112, 90), (96, 120)]  # (H, W), not multiples of 16
LABELS = [[0, 14], [4], [8, 11, 14]]  # VOC class indices (0 = aeroplane)


# ------------------------------------------------------------------------------ shared with the test
def released_state(shapes: dict, seed: int = STATE_SEED) -> dict[str, torch.Tensor]:
    """Their ``Net``'s parameters and buffers (canonical names: ``resnet50.*``, ``side1..4``,
    ``classifier``, ``f9``) as a function of (seed, name, shape) only: convolutions Kaiming-uniform,
    BatchNorm weight U(0.5, 1), bias and running mean U(-0.1, 0.1), running variance U(0.5, 1.5)."""
    out = {}
    for name, shape in shapes.items():
        rs = np.random.RandomState(zlib.crc32(f"{seed}/{name}".encode()))
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros(shape, dtype=torch.long)
            continue
        if len(shape) == 4:
            bound = float(np.sqrt(6.0 / np.prod(shape[1:])))
            lo, hi = -bound, bound
        elif leaf == "weight":
            lo, hi = 0.5, 1.0
        elif leaf == "running_var":
            lo, hi = 0.5, 1.5
        else:
            lo, hi = -0.1, 0.1
        out[name] = torch.from_numpy((lo + (hi - lo) * rs.random_sample(shape)).astype(np.float32))
    return out


def step_seed(train_seed: int, step: int = 0, rank: int = 0) -> int:
    """The numpy seed of tokenseg's k-means draws at a training step (``methods/pot.py``)."""
    return int(np.random.SeedSequence([train_seed, step, rank, 7]).generate_state(1)[0])


# ------------------------------------------------------------------------------ inputs
def _image(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    """Blobs of a few colours on a textured ground: regions the CAM and the k-means can tell apart."""
    yy, xx = np.mgrid[:h, :w]
    img = rng.uniform(40, 90, (h, w, 3)) + 30 * np.sin(xx / 7.0)[..., None]
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(12, 35)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 12, (int(inside.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _clip_maps(rng: np.random.RandomState, h: int, w: int, k: int) -> np.ndarray:
    """CLIP-ES-like maps in [0, 1] (a smooth bump per class, max 1), float16-exact values."""
    yy, xx = np.mgrid[:h, :w]
    maps = []
    for _ in range(k):
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.45) * min(h, w)
        m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.uniform(0, 0.05, (h, w))
        maps.append(m / m.max())
    return np.stack(maps).astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------------------ their code
def _shim_modules() -> None:
    for name in ("cv2", "pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.__version__ = "4.0.0"
            mod.unary_from_labels = None
            mod.DenseCRF2D = None
            sys.modules[name] = mod
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self


@contextlib.contextmanager
def _quiet():
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def _lines(path: Path, first: str, last: str, after: str = "") -> str:
    """The source lines of their file from the first line containing ``first`` (after the first line
    containing ``after``) to the first line after it containing ``last``, dedented (run as they are)."""
    text = path.read_text().splitlines()
    start = next(n for n, line in enumerate(text) if after in line)
    i = next(n for n in range(start, len(text)) if first in text[n])
    j = next(n for n in range(i, len(text)) if last in text[n])
    return textwrap.dedent("\n".join(text[i:j + 1]))


class _NumpyWithClip(types.ModuleType):
    """numpy, except ``load`` of ``<anything>/<image>.npy`` returns that image's CLIP-ES dict."""

    def __init__(self, clip: dict) -> None:
        super().__init__("numpy")
        self._clip = clip

    def __getattr__(self, key):
        return getattr(np, key)

    def load(self, path, allow_pickle=False):
        d = self._clip[Path(path).stem]
        return np.array(d, dtype=object)  # .item() gives the dict back


def _build_nets(pot: Path):
    from network import resnet50 as their_resnet
    from network import resnet50_POT

    def no_download(*a, **k):
        sd = their_resnet.ResNet(their_resnet.Bottleneck, [3, 4, 6, 3]).state_dict()
        return {**sd, "fc.weight": torch.zeros(0), "fc.bias": torch.zeros(0)}

    their_resnet.model_zoo.load_url = no_download
    nets = []
    for cls in (resnet50_POT.Net, resnet50_POT.CAM):
        net = cls(num_cls=21)
        named = dict(net.named_parameters())
        named.update(dict(net.named_buffers()))
        shapes = {k: list(v.shape) for k, v in named.items()}
        state = released_state(shapes)
        with torch.no_grad():
            for k, v in named.items():
                v.copy_(state[k])
        nets.append(net)
    return nets[0], nets[1], shapes


def _dataset(cls, root: Path, labels: list, **attrs):
    from data import data_voc

    ds = cls.__new__(cls)  # their __init__ reads data/cls_labels_voc.npy and a list file
    ds.img_name_list, ds.voc12_root = list(NAMES), str(root)
    ds.label_list = [np.eye(20, dtype=np.float32)[lab].sum(0) for lab in labels]
    ds.img_normal = data_voc.TorchvisionNormalize()
    for k, v in dict(resize=None, resize_long=None, rescale=None, crop_size=None, hor_flip=False,
                     crop_method=None, to_torch=True, scales=(1.0,)).items():
        setattr(ds, k, attrs.get(k, v))
    return ds


def run_theirs(pot: Path, work: Path) -> dict:
    """Their inference (every image, all scales) and one training step (all images in one batch)."""
    import torch.nn.functional as F
    from PIL import Image
    from torch.cuda.amp import autocast
    from torch.utils.data import DataLoader
    from torch.utils.data.dataloader import default_collate

    sys.path.insert(0, str(pot))
    os.chdir(pot)
    _shim_modules()
    from data import data_voc

    rng = np.random.RandomState(7)
    (work / "JPEGImages").mkdir(parents=True, exist_ok=True)
    clip, out = {}, {}
    for name, (h, w), lab in zip(NAMES, SIZES, LABELS):
        Image.fromarray(_image(rng, h, w)).save(work / "JPEGImages" / f"{name}.jpg", quality=95)
        clip[name] = {"keys": np.array(lab, np.int64), "attn_highres": _clip_maps(rng, h, w, len(lab))}
    net, cam_net, shapes = _build_nets(pot)
    torch.set_grad_enabled(False)

    # inference: make_cam.py's _work, one image at a time
    block = _lines(pot / "make_cam.py", "outputs = [model(", "IS_CAM1 = IS_CAM1[valid_cat]")
    msf = _dataset(data_voc.VOC12ClsDatasetMSF, work, LABELS, scales=SCALES)

    def seeded(*a):
        np.random.seed(MAP_SEED)
        return cam_net(*a)

    for pack in DataLoader(msf, shuffle=False, num_workers=0):
        name = pack["name"][0]
        label = F.pad(pack["label"][0], (1, 0), "constant", 1.0)  # their _work, before the block
        ns = dict(model=seeded, pack=pack, label=label, size=pack["size"], cams_clip=clip[name]["attn_highres"],
                  keys=clip[name]["keys"], F=F, torch=torch, np=np, args=argparse.Namespace(visualize=False))
        with _quiet():
            exec(block, ns)
        out[f"{name}/keys"] = ns["valid_cat"].astype(np.int64)
        out[f"{name}/IS_CAM"] = ns["IS_CAM"].astype(np.float32)
        out[f"{name}/IS_CAM1"] = ns["IS_CAM1"].astype(np.float32)
        out[f"{name}/clip"] = clip[name]["attn_highres"]
        out[f"{name}/labels"] = np.array(LABELS[NAMES.index(name)], np.int64)

    # training: one step of train_resnet50_POT.py on a batch of every image
    torch.set_grad_enabled(True)
    tds = _dataset(data_voc.VOC12ClsDataset, work, LABELS, resize=(TRAIN_SIZE, TRAIN_SIZE))
    pack = default_collate([tds[i] for i in range(len(NAMES))])
    step = _lines(pot / "train_resnet50_POT.py", "img = pack['img'].cuda()", "losses = 0.5 * lossCLS + lossCon",
                  after="for step, pack in enumerate(train_data_loader)")
    ns = dict(pack=pack, model=net, np=_NumpyWithClip(clip), os=os, F=F, torch=torch, autocast=autocast,
              avg_meter=types.SimpleNamespace(add=lambda *a, **k: None))
    np.random.seed(step_seed(TRAIN_SEED))
    with _quiet():
        exec(step, ns)
        ns["losses"].backward()
    out["train/image"] = pack["img"].numpy().astype(np.float32)
    out["train/labels"] = pack["label"].numpy().astype(np.float32)
    out["train/cam_class"] = ns["cam_class"].detach().float().numpy()  # masked, max-normalised (their lines)
    out["train/cam_add"] = ns["cam_add"].detach().float().numpy()
    out["train/score"] = ns["outputs"]["score"].detach().float().numpy()[:, :, 0, 0]
    out["train/lossCLS"] = np.float32(ns["lossCLS"].item())
    out["train/lossCon"] = np.float32(ns["lossCon"].item())
    out["train/losses"] = np.float32(ns["losses"].item())
    for k in ("classifier.weight", "side1.weight"):
        out[f"train/grad/{k}"] = dict(net.named_parameters())[k].grad.numpy().copy()
    return out, shapes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pot", required=True, type=Path, help="the POT/ folder of a clone of jianwang91/POT")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/authors-pot")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pot-fixture-work"))
    args = ap.parse_args(argv)
    pot, out_dir = args.pot.resolve(), args.out.resolve()
    if not (pot / "network" / "resnet50_POT.py").is_file():
        ap.error(f"--pot: {pot} has no network/resnet50_POT.py (give the POT/ folder of the clone)")
    commit = subprocess.run(["git", "-C", str(pot), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(1)
    work = args.work.resolve()
    ref, shapes = run_theirs(pot, work)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        (out_dir / "images" / f"{name}.jpg").write_bytes((work / "JPEGImages" / f"{name}.jpg").read_bytes())
    np.savez_compressed(out_dir / "pot_reference.npz", **ref)
    (out_dir / "state_shapes.json").write_text(json.dumps(shapes) + "\n")
    meta = {"source": "https://github.com/jianwang91/POT", "commit": commit, "state_seed": STATE_SEED,
            "map_seed": MAP_SEED, "train_seed": TRAIN_SEED, "scales": list(SCALES), "train_size": TRAIN_SIZE,
            "names": NAMES, "labels": LABELS, "torch": torch.__version__, "numpy": np.__version__,
            "kmeans_pytorch": _version("kmeans-pytorch")}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out_dir}")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    raise SystemExit(main())
