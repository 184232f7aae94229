"""The demo recipes' support: the synthetic generator's object-scale knob and benchmarks/bench_demos.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from tokenseg.config import SyntheticConfig
from tokenseg.data.synthetic import default_root, render_image

# sha256 of the (image, mask) bytes of the 6 renders below, and the cache folder names of two configs, as
# the generator gave them before `object_scale` existed (git 30bcad3, src/tokenseg/data/synthetic.py)
OLD_DIGEST = "cc250d1b8f0452ef6c469418fe90e772eabb8f08baf3b93e633260d5e8421ed8"
OLD_FOLDERS = ("synthetic-65d1fae60f", "synthetic-9ec3a3f887")


def _digest(cfg: SyntheticConfig) -> tuple[str, list[np.ndarray]]:
    h, masks = hashlib.sha256(), []
    for i in range(6):
        img, mask, _ = render_image(np.random.default_rng([4, i]), cfg)
        h.update(img.tobytes())
        h.update(mask.tobytes())
        masks.append(mask)
    return h.hexdigest(), masks


def test_object_scale_default_reproduces_the_old_images_and_folders():
    digest, _ = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4))
    assert digest == OLD_DIGEST
    names = (default_root(SyntheticConfig(), Path("c")).name,
             default_root(SyntheticConfig(num_classes=6, seed=1), Path("c")).name)
    assert names == OLD_FOLDERS  # the cached demo data keep their folder (no regeneration, same stamp)


def test_object_scale_changes_the_objects_size():
    _, base = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4))
    _, small = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4, object_scale=0.6))
    _, large = _digest(SyntheticConfig(num_classes=6, image_size=48, seed=4, object_scale=1.4))
    area = [sum(int(((m > 0) & (m < 255)).sum()) for m in ms) for ms in (small, base, large)]
    assert area[0] < area[1] < area[2]
    assert default_root(SyntheticConfig(object_scale=0.6), Path("c")) != default_root(SyntheticConfig(), Path("c"))


def test_object_scale_must_be_positive():
    from tokenseg.config import load_config
    from tokenseg.io import TokensegError

    with pytest.raises(TokensegError, match="object_scale"):
        load_config("demo", ["data.synthetic.object_scale=0"])
