"""The one seed loop (`tokenseg.maps.generate_seeds`) with a method's own hooks, written here: every image
of this rank done once, finished images skipped on a re-run, the writer given each batch's indices, and an
allocation failure turned into a message naming the images and what to set."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenseg.config import MapsConfig
from tokenseg.core.errors import TokensegError
from tokenseg.core.seeds import SeedMaps, load_seed, save_seed, seed_path
from tokenseg.data import WSSSDataset
from tokenseg.maps import generate_seeds
from tokenseg.methods.base import SeedHooks


def dataset(root: Path, sizes=((20, 30), (20, 30), (24, 16), (20, 30), (24, 16))) -> WSSSDataset:
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = root / f"im{i}.png"
        Image.fromarray(np.full((h, w, 3), 10 * i, np.uint8)).save(p)
        paths.append(p)
    return WSSSDataset("toy", ["a", "b"], [f"im{i}" for i in range(len(sizes))], paths,
                       [[i % 2] for i in range(len(sizes))], None)


def mean_hooks(calls: list) -> SeedHooks:
    """Each image's map: its mean grey value everywhere (hand-checkable); batches of equal size."""

    def compute(job, batch):
        raw, labels, idx = batch
        calls.append(idx.tolist())
        return raw.float().mean((1, 2, 3)), labels

    def write(job, result, idx):
        means, labels = result
        for b, i in enumerate(idx):
            h, w = job.ds.load_image(i).size[::-1]
            classes = np.flatnonzero(labels[b].numpy()).astype(np.int64)
            maps = np.full((len(classes), h, w), float(means[b]) / 255, np.float32)
            save_seed(seed_path(job.out_dir / job.kinds[0], job.ds.ids[i]), SeedMaps(classes, maps))

    return SeedHooks(compute=compute, write=write)


def test_hooks_run_once_per_image_resume_and_shard(tmp_path):
    ds = dataset(tmp_path)
    mc = MapsConfig(kinds=["grey"], batch_size=2, save_dtype="float32")
    calls: list = []
    out = generate_seeds(torch.nn.Identity(), ds, tmp_path / "out", mc, progress=False, hooks=mean_hooks(calls))
    assert sorted(i for c in calls for i in c) == list(range(5))
    assert all(len({ds.load_image(i).size for i in c}) == 1 and len(c) <= 2 for c in calls)  # equal sizes
    for i in range(5):
        seed = load_seed(out / "grey" / f"im{i}.npz")
        assert seed.classes.tolist() == [i % 2] and np.allclose(seed.maps, 10 * i / 255)
    (out / "grey" / "im3.npz").unlink()
    calls.clear()
    generate_seeds(torch.nn.Identity(), ds, out, mc, progress=False, hooks=mean_hooks(calls))
    assert calls == [[3]]  # only the missing image is redone
    calls.clear()
    generate_seeds(torch.nn.Identity(), ds, tmp_path / "rank1", mc, progress=False, hooks=mean_hooks(calls),
                   rank=1, world=2)
    assert sorted(i for c in calls for i in c) == [1, 3]


def test_an_allocation_failure_names_the_images_and_the_setting(tmp_path):
    ds = dataset(tmp_path)

    def compute(job, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hooks = SeedHooks(compute=compute, write=lambda *a: None)
    with pytest.raises(TokensegError, match=r"out of memory on image\(s\) im0, im1 \(30×20 px\).*maps.max_side"):
        generate_seeds(torch.nn.Identity(), ds, tmp_path / "out", MapsConfig(kinds=["grey"], batch_size=2),
                       progress=False, hooks=hooks)
