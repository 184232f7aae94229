"""Floors for end-to-end seed numbers: what a trivial prediction scores on the same split.

``background_only_miou`` predicts background everywhere and scores it by hand (numpy counts, not the
package's evaluator): background IoU = background pixels / valid pixels, every object class 0. Divided
by the background and the classes that occur in the ground truth, it is the highest the trivial
prediction reaches under any of the evaluator's class rules, so "seeds beat it" is a real claim.
"""
from __future__ import annotations

import numpy as np

from tokenseg.data import WSSSDataset


def background_only_miou(ds: WSSSDataset) -> float:
    bg = valid = 0
    seen: set[int] = set()
    for i in range(len(ds)):
        m = ds.load_mask(i)
        ok = m != 255
        bg += int(((m == 0) & ok).sum())
        valid += int(ok.sum())
        seen.update(int(v) for v in np.unique(m[ok]) if v != 0)
    return 100.0 * bg / valid / (len(seen) + 1)
