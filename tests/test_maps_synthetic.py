"""Seed pipeline invariants and the synthetic dataset's contract."""
import hashlib

import numpy as np
import pytest
import torch

from tokenseg.config import MapsConfig, SyntheticConfig
from tokenseg.data.synthetic import ensure_synthetic
from tokenseg.data.voc import load_voc
from tokenseg.maps import compute_maps
from tokenseg.methods.mapops import minmax_per_class
from test_model import tiny_model


def test_flip_consistency():
    """With flip on, the maps of a mirrored image are the mirrored maps (sum over orig + flip)."""
    m = tiny_model(C=3, depth=3)
    x = torch.randn(2, 3, 32, 48)
    y = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    cfg = MapsConfig(scales=[1.0, 0.75], flip=True, layers=2,
                     kinds=["attention", "attention_affinity", "patchcam", "fused", "fused_affinity"])
    a = compute_maps(m, x, y, cfg)
    b = compute_maps(m, x.flip(-1), y, cfg)
    for k in cfg.kinds:
        # float32 sums in another order, then min-max stretches the (flat, random-weight) maps
        torch.testing.assert_close(b[k], a[k].flip(-1), atol=5e-4, rtol=0)
        assert (a[k][y == 0] == 0).all()  # absent classes are zero
        present = a[k][y == 1].flatten(1)
        # max is (hi - lo)/(hi - lo + 1e-8): 1 up to the epsilon on flat random-weight maps
        torch.testing.assert_close(present.amax(1), torch.ones(len(present)), atol=1e-4, rtol=0)
        torch.testing.assert_close(present.amin(1), torch.zeros(len(present)), atol=1e-6, rtol=0)


def test_single_scale_fused_matches_hand_computation():
    m = tiny_model(C=2, depth=2)
    x = torch.randn(1, 3, 32, 32)
    y = torch.tensor([[1.0, 1.0]])
    cfg = MapsConfig(scales=[1.0], flip=False, layers=2, layer_reduce="mean", fusion="sqrt",
                     kinds=["fused", "fused_affinity"])
    got = compute_maps(m, x, y, cfg)
    out = m.forward_maps(x, last_k=2, affinity=True)
    fused = (out.attention * out.patchcam).sqrt()
    ref = torch.einsum("bij,bcj->bci", out.affinity, fused.flatten(2)).view_as(fused)
    for kind, base in (("fused", fused), ("fused_affinity", ref)):
        up = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(got[kind], minmax_per_class(up, y), atol=1e-5, rtol=1e-4)


def _digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".jpg", ".png", ".txt", ".json"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_dataset_is_deterministic_voc_layout(tmp_path):
    cfg = SyntheticConfig(num_classes=4, image_size=48, train_images=12, val_images=4, seed=3)
    a = ensure_synthetic(cfg, tmp_path / "a", exact=True, progress=False)
    b = ensure_synthetic(cfg, tmp_path / "b", exact=True, progress=False)
    assert _digest(a) == _digest(b)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        assert (a / sub).is_dir()
    ds = load_voc(a, "train")
    assert len(ds) == 12 and ds.num_classes == 4 and ds.has_masks
    for i in range(len(ds)):
        mask = ds.load_mask(i)
        present = sorted(set(np.unique(mask).tolist()) - {0, 255})
        assert [c + 1 for c in ds.labels[i]] == present  # labels are the classes the mask shows
        assert 1 <= len(ds.labels[i]) <= 3
    # other parameters may not reuse a folder made with different ones
    from tokenseg.core.errors import TokensegError

    with pytest.raises(TokensegError, match="other parameters"):
        ensure_synthetic(SyntheticConfig(num_classes=3), a, exact=True, progress=False)


def test_synthetic_cooccurrence_bias():
    """A class sits on its home background kind with probability ~ cooccurrence + (1 - co)/K."""
    from tokenseg.data.synthetic import render_image

    for co in (0.8, 0.0):
        cfg = SyntheticConfig(num_classes=5, image_size=32, cooccurrence=co)
        home = 0
        n = 300
        for i in range(n):
            _, _, info = render_image(np.random.default_rng([9, i]), cfg)
            home += int(info["background"] == info["classes"][0])
        expected = co + (1 - co) / 5
        assert abs(home / n - expected) < 0.08, (co, home / n)
